"""checkpoint.py — saving and resuming: HF-format folders and crash-safe training checkpoints.

Plumbing only (docs/checkpoints.md): what every script writes at the end, and what a pre-empted run
needs to go on exactly where it stopped.
  1. Final outputs: save_hf (a policy) and save_value_model (backbone + value_head.safetensors + a JSON
     config: the GVM, the reward model, the critic) gather a full state dict on rank 0 (a collective)
     and write an HF folder through a temp folder whose files are then moved in (staged_dir).
  2. Training checkpoints (save_checkpoint / load_checkpoint): the policy in HF format, other trained
     models in subfolders, trainer_state.pt with `state` and every optimizer's full state. Written into
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

import torch
from safetensors.torch import save_file

import fsdp_utils as fu

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
            elif source:
                fu.print0(f"{path + source} (complete, step {step}) promoted to {path}")
    err, step = fu.broadcast_object((err, step))
    if err:  # one line (not one per rank), out before any rank exits: torchrun then stops the others
        if fu.rank() == 0:
            print(f"{script}: {err}", file=sys.stderr, flush=True)
        fu.barrier()
        sys.exit(1)
    return step is not None


def save_checkpoint(path: str, tok, state: dict, trained: dict):
    """A resumable checkpoint: trained = {"policy": (model, optimizer), and e.g. "critic": (value model,
    optimizer)}. The policy goes at the top level (HF format, loadable on its own), every other model in
    a subfolder of its name (value model format); trainer_state.pt holds `state` (step, KL β, ...) and
    every optimizer's full state. Every random draw is a function of the step, so this is all a resumed
    run needs. Written into path.tmp, marked complete by its manifest, then swapped in by
    recover_checkpoint (the previous one becomes path.old). A collective under FSDP."""
    sds = {name: fu.full_state_dict(m) for name, (m, _) in trained.items()}
    osds = {name: fu.full_optim_state_dict(m, o) for name, (m, o) in trained.items()}
    # recovery first: afterwards path.tmp does not exist; skipped if `path` holds this step (a rerun's final save)
    if fu.rank() == 0 and recover_checkpoint(path)[0] != state["step"]:
        write_hf(trained["policy"][0], tok, path + ".tmp", sds["policy"])
        fault_point("weights")
        for name, (m, _) in trained.items():
            if name != "policy":
                write_value_model(m, tok, os.path.join(path + ".tmp", name), sds[name], f"{name}_config.json",
                                  {"role": name})
        torch.save({**state, "optimizers": osds}, os.path.join(path + ".tmp", "trainer_state.pt"))
        write_manifest(path + ".tmp", state["step"])
        recover_checkpoint(path)  # the swap: path -> path.old, path.tmp -> path, the older path.old deleted
    fu.barrier()


def load_checkpoint(path: str, state: dict, trained: dict):
    """Inverse of save_checkpoint for the optimizers and `state` (the models were loaded from the
    folder already). Rank 0 reads the file; optimizer state is sharded out from its full copy."""
    st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False) if fu.rank() == 0 else {}
    osds = st.pop("optimizers", {})  # stays on rank 0: sharded out tensor by tensor, not pickled to every rank
    state.update(fu.broadcast_object(st))
    for name, (m, o) in trained.items():
        fu.load_full_optim_state_dict(m, o, osds.get(name, {}))
