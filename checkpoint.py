"""checkpoint.py — saving and resuming: HF-format folders and crash-safe training checkpoints.

Plumbing only (docs/checkpoints.md): what every script writes at the end, and what a pre-empted run
needs to go on exactly where it stopped.
  1. Final outputs: save_hf (a policy) and save_value_model (backbone + value_head.safetensors + a JSON
     config: the GVM, the reward model, the critic) gather a full state dict on rank 0 (a collective)
     and write an HF folder through a temp folder whose files are then moved in (staged_dir).
  2. Training checkpoints (save_checkpoint / load_checkpoint), sharded with torch.distributed.checkpoint
     (DCP): every rank writes its own shards of every trained model and its optimizer (no rank gathers
     a full state dict), rank 0 writes trainer_state.pt with every rank's `state`. Written into
     checkpoint.tmp; a manifest written last (step, each file's size) marks it complete;
     recover_checkpoint promotes the newest complete one of checkpoint, checkpoint.old, checkpoint.tmp
     after a kill at any instant; resume_or_fresh implements --resume no|auto|yes and --overwrite.
  3. fault_point: tests kill a save at a named point (DVPO_KILL_AT=<point>:<n>).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import fsdp_utils as fu

# one process (no process group) is an intended path of the same code, not a mistake DCP should warn about
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# ----------------------------------------------------------------------------------------------
# 1. Final outputs: HF-format folders

@contextlib.contextmanager
def staged_dir(path: str):
    """Yield a temp folder on rank 0 (None elsewhere); once everything is written there, move its files
    into `path` one by one (each os.replace is atomic; other files there, like metrics.jsonl, are kept).
    A kill half-way leaves a mix of new and old files: the final outputs are rewritten by the resumed run."""
    if fu.rank() != 0:
        yield None
        return
    tmp = path.rstrip("/") + ".tmp"
    if os.path.exists(tmp):  # left by a killed run
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    yield tmp
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
        fault_point("final")
    os.rmdir(tmp)


_fault_hits: dict = {}  # fault_point's counters (tests only)


def fault_point(name: str):
    """Tests only: with DVPO_KILL_AT=<name>:<n> in the environment, SIGKILL this process the n-th time
    execution reaches fault_point(name) (the points are listed in docs/checkpoints.md). A no-op otherwise."""
    spec = os.environ.get("DVPO_KILL_AT", "")
    if spec.rpartition(":")[0] != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(spec.rpartition(":")[2]):
        os.kill(os.getpid(), signal.SIGKILL)


def write_hf(model, tokenizer, folder: str, state_dict: dict, extra: dict | None = None):
    """Rank 0 writes an HF-format folder: config.json, safetensors weights, tokenizer, and `extra`
    (file name -> state dict as .safetensors, object as .pt, or dict as JSON)."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name, obj in (extra or {}).items():
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in obj.items()}, os.path.join(folder, name))
        elif name.endswith(".pt"):
            torch.save(obj, os.path.join(folder, name))
        else:
            with open(os.path.join(folder, name), "w") as f:
                json.dump(obj, f, indent=2)


def save_hf(model, tokenizer, path: str, state_dict: dict | None = None, extra: dict | None = None):
    """Gather (a collective: every rank calls this) and write an HF folder from rank 0 through a
    temp folder (see staged_dir). `model` is the HF PreTrainedModel, possibly FSDP-sharded."""
    sd = fu.full_state_dict(model) if state_dict is None else state_dict
    with staged_dir(path) as tmp:
        if tmp is not None:
            write_hf(model, tokenizer, tmp, sd, extra)
    fu.barrier()


def split_value_state(sd: dict) -> tuple[dict, dict]:
    """Full ValueModel state dict -> (backbone state dict, value head state dict)."""
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    head = {k[len("value_head."):]: v for k, v in sd.items() if k.startswith("value_head.")}
    return backbone, head


def write_value_model(model, tokenizer, folder: str, state_dict: dict, config_name: str, config: dict):
    """Rank 0 writes a value model folder from a full state dict (see save_value_model)."""
    backbone, head = split_value_state(state_dict)
    write_hf(model.backbone, tokenizer, folder, backbone,
                {"value_head.safetensors": head, config_name: config})


def save_value_model(model, tokenizer, path: str, config_name: str, config: dict):
    """Backbone in HF format (safetensors) + value_head.safetensors + config + tokenizer.
    A collective under FSDP: every rank calls it, rank 0 writes."""
    sd = fu.full_state_dict(model)
    with staged_dir(path) as tmp:
        if tmp is not None:
            write_value_model(model, tokenizer, tmp, sd, config_name, config)
    fu.barrier()


# ----------------------------------------------------------------------------------------------
# 2. Crash-safe training checkpoints

def trim_metrics(path: str, step: int):
    """On resume: keep the metrics.jsonl rows of steps up to the checkpoint's (the resumed run logs the
    later ones again) and drop a line cut short by a kill during its append. Rewritten atomically."""
    if fu.rank() != 0 or not os.path.exists(path):
        return
    rows = []
    for line in open(path):
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line.rstrip("\n") + "\n")
        except (ValueError, KeyError):  # a partial line: the run was killed while appending it
            pass
    write_atomic(path, "".join(rows))


def fsync_path(path: str):
    """Flush a file, or a folder's entries (names created or renamed in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str):
    """Replace a file's content so that a kill (or a crash) at any instant leaves the old or the new one."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_path(os.path.dirname(path) or ".")


MANIFEST = "manifest.json"  # written last into a checkpoint folder: the mark that it is complete
SUFFIXES = ("", ".old", ".tmp")  # checkpoint, checkpoint.old, checkpoint.tmp; preferred in this order on a tie


def checkpoint_status(folder: str) -> int | str:
    """The step of the complete checkpoint in `folder` (its manifest exists and every file it lists exists
    with the listed size: this catches truncated weights and a missing trainer state), or why it is not one."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        step, files = int(manifest["step"]), dict(manifest["files"])
    except FileNotFoundError:
        return f"{folder} has no {MANIFEST} (a save or a deletion that did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{os.path.join(folder, MANIFEST)} is unreadable ({e})"
    for rel, size in files.items():
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            return f"{p} is missing"
        if os.path.getsize(p) != size:
            return f"{p} has {os.path.getsize(p)} bytes, the manifest says {size} (truncated?)"
    return step


def write_manifest(folder: str, step: int):
    """Mark a fully written checkpoint folder complete: flush every file to disk, then write the manifest
    (step, each file's size) atomically. A kill before it leaves a folder that recovery discards."""
    files = {}
    for root, _, names in sorted(os.walk(folder)):
        for n in sorted(names):
            fsync_path(os.path.join(root, n))
            files[os.path.relpath(os.path.join(root, n), folder)] = os.path.getsize(os.path.join(root, n))
        fsync_path(root)
    fault_point("files")
    write_atomic(os.path.join(folder, MANIFEST), json.dumps({"step": step, "files": files}, indent=1))
    fault_point("manifest")


def remove_checkpoint(folder: str):
    """Delete a checkpoint folder, its manifest first: a kill half-way leaves a visibly incomplete folder
    (which recovery deletes), never one that looks complete or blocks a rename."""
    if os.path.exists(os.path.join(folder, MANIFEST)):
        os.remove(os.path.join(folder, MANIFEST))
        fsync_path(folder)
    for root, _, names in os.walk(folder):
        for n in names:
            os.remove(os.path.join(root, n))
            fault_point("delete")
    shutil.rmtree(folder)


def recover_checkpoint(path: str) -> tuple[int | None, str]:
    """Rank 0, at start-up and around every save. Of path, path.old and path.tmp: make the newest complete
    checkpoint (highest step) `path`, keep the newest complete one before it as path.old (the fallback
    if `path` turns out corrupted), delete the rest. Returns (its step, the suffix it had) or (None, "").
    Every action either deletes a folder that is not the newest complete one or is one atomic rename, so
    a kill at any instant leaves the newest complete checkpoint under one of the three names, and calling
    this again finishes the job. A save = write path.tmp, then its manifest, then call this (the swap)."""
    status = {s: checkpoint_status(path + s) for s in SUFFIXES if os.path.lexists(path + s)}
    complete = sorted((st, -SUFFIXES.index(s), s) for s, st in status.items() if isinstance(st, int))
    best = complete[-1][2] if complete else None
    prev = next((s for step, _, s in reversed(complete) if step < complete[-1][0]), None)
    for s, st in status.items():
        if s not in (best, prev):
            if not isinstance(st, int):
                fu.print0(f"checkpoint recovery: {st}; removed it")
            remove_checkpoint(path + s)
    if best not in (None, ""):
        if os.path.lexists(path):  # it is prev: it becomes the fallback, unless best sits there
            if best == ".old":
                remove_checkpoint(path)
            else:
                os.replace(path, path + ".old")
                fault_point("to_old")
        os.replace(path + best, path)
        fsync_path(os.path.dirname(path) or ".")
        fault_point("to_new")
    if prev == ".tmp":
        os.replace(path + ".tmp", path + ".old")
        fsync_path(os.path.dirname(path) or ".")
    return (complete[-1][0], best) if complete else (None, "")


def resume_or_fresh(path: str, resume: str, overwrite: bool, script: str) -> bool:
    """--resume no|auto|yes and --overwrite (docs/checkpoints.md), decided on rank 0 and shared: True to
    resume from the checkpoint at `path` (recovered first), False to start fresh. One line and exit 1
    when the flags and the folder disagree, or the only checkpoint is corrupted; never a silent restart."""
    err, step = "", None
    if fu.rank() == 0:
        names = "/".join(os.path.basename(path) + s for s in SUFFIXES)
        status = {s: checkpoint_status(path + s) for s in SUFFIXES if os.path.lexists(path + s)}
        steps = [st for st in status.values() if isinstance(st, int)]
        corrupted = [st for s, st in status.items()  # a manifest but bad files: damaged after its save
                     if isinstance(st, str) and os.path.exists(os.path.join(path + s, MANIFEST))]
        if resume not in ("no", "auto", "yes"):
            err = f"--resume must be no, auto or yes, got {resume!r}"
        elif overwrite and resume != "no":
            err = f"--overwrite starts afresh; it contradicts --resume {resume}"
        elif overwrite:
            for s in status:
                remove_checkpoint(path + s)
                fu.print0(f"--overwrite: removed {path + s}")
        elif resume == "no" and (steps or corrupted):
            err = (f"{os.path.dirname(path) or '.'} holds a checkpoint" + (f" (step {max(steps)})" if steps else "")
                   + "; continue it with --resume auto, or start over with --overwrite (deletes it and metrics.jsonl)")
        elif resume != "no" and corrupted and not steps:
            err = f"{corrupted[0]}; no complete checkpoint to fall back to (--overwrite starts over)"
        elif resume != "no":
            step, source = recover_checkpoint(path)
            if step is None and resume == "yes":
                err = f"--resume yes: no checkpoint in {os.path.dirname(path) or '.'} ({names})"
            elif step is None:
                fu.print0(f"--resume auto: no checkpoint in {os.path.dirname(path) or '.'}, starting fresh")
            elif not os.path.exists(os.path.join(path, ".metadata")):  # no DCP index: written before issue 18
                err = (f"{path} (step {step}) is an unsharded checkpoint (an HF folder) of an older version of this "
                       "code; resume it with that version, or start over with --overwrite")
            elif source:
                fu.print0(f"{path + source} (complete, step {step}) promoted to {path}")
    err, step = fu.broadcast_object((err, step))
    if err:  # one line (not one per rank), out before any rank exits: torchrun then stops the others
        if fu.rank() == 0:
            print(f"{script}: {err}", file=sys.stderr, flush=True)
        fu.barrier()
        sys.exit(1)
    return step is not None


def sharded_state(trained: dict) -> dict:
    """{name: {"model": ..., "optim": ...}} for trained = {name: (model, optimizer)}: this rank's shards
    (FSDP2: DTensors viewing the parameters and the optimizer state, no copy; one process: the plain
    tensors). Keys are parameter names, the same for every process count. An optimizer that has not
    stepped yet gets its state allocated here (a step at lr 0 on zero gradients; the weights do not move)."""
    out = {}
    for name, (m, o) in trained.items():
        msd, osd = get_state_dict(m, o)  # sharded (full_state_dict=False): no gather
        out[name] = {"model": msd, "optim": osd}
    return out


def save_checkpoint(path: str, tok, state: dict, trained: dict):
    """A resumable checkpoint: trained = {"policy": (model, optimizer), and e.g. "critic": (value model,
    optimizer)}. Every rank writes its own shards of every model and optimizer with torch.distributed.
    checkpoint (__<rank>_0.distcp; rank 0 also writes DCP's .metadata, the index of every shard), and
    rank 0 writes trainer_state.pt with every rank's `state` (step, KL β, ...; DVPO's τ pool is this
    rank's batch, so it differs by rank). Every random draw is a function of the step, so this is all a
    resumed run needs. Written into path.tmp, marked complete by its manifest, then swapped in by
    recover_checkpoint (the previous one becomes path.old). `out_dir` must be one filesystem that every
    rank sees (shared across nodes): rank 0 lists and checks every rank's files. `tok` is not saved (a
    resumed run reads it from --model as a fresh one does). A collective: every rank calls it."""
    # recovery first (rank 0): afterwards path.tmp does not exist; skipped if `path` holds this step (a rerun's
    # final save)
    done = fu.rank() == 0 and recover_checkpoint(path)[0] == state["step"]
    if fu.broadcast_object(done):  # a collective: every rank calls it; no rank writes before recovery is over
        return
    states = fu.all_gather_object(state)  # a collective: every rank calls it (small: step, β, τ pool)
    dcp.save(sharded_state(trained), checkpoint_id=path + ".tmp")  # a collective: every rank writes its shards
    fault_point("weights")
    if fu.rank() == 0:
        torch.save({"world": fu.world(), "ranks": states}, os.path.join(path + ".tmp", "trainer_state.pt"))
    fu.barrier()  # a collective: every rank's files are written before rank 0 lists them
    if fu.rank() == 0:
        write_manifest(path + ".tmp", state["step"])
        recover_checkpoint(path)  # the swap: path -> path.old, path.tmp -> path, the older path.old deleted
    fu.barrier()  # a collective: no rank goes on (and may save again) before the swap


def load_checkpoint(path: str, state: dict, trained: dict):
    """Inverse of save_checkpoint, into models and optimizers built (and sharded) as for a fresh run:
    each rank reads the slices of the saved shards that overlap its own (DCP reshards, so the process
    count may differ from the saving run's) straight into its parameters and optimizer state, and
    `state` becomes this rank's saved state (rank r of a different process count: saved rank r mod N)."""
    st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False) if fu.rank() == 0 else None
    st = fu.broadcast_object(st)  # a collective: every rank calls it
    state.update(st["ranks"][fu.rank() % len(st["ranks"])])
    if st["world"] != fu.world():
        fu.print0(f"{path} was saved at world size {st['world']}, resumed at {fu.world()}: resharded")
    sd = sharded_state(trained)
    dcp.load(sd, checkpoint_id=path)  # a collective: every rank reads its shards, in place
    for name, (m, o) in trained.items():
        set_state_dict(m, o, model_state_dict=sd[name]["model"], optim_state_dict=sd[name]["optim"])
