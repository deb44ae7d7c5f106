"""Crash-safe checkpoints (docs/checkpoints.md): a SIGKILL at any point of a save, of start-up recovery
or of the final outputs, then --resume auto, ends in the uninterrupted run's final weights bit for bit
and one metrics row per step; corrupted checkpoints fall back to the previous one; --resume says what
it does. Tiny models, --save_every 1, one CPU thread.

Most runs are `main()` of the script in a child forked from this process: a real, separate process,
killed for real (SIGKILL) at a fault point (DVPO_KILL_AT), minus the ~4 s of imports that a fresh
`python dvpo.py` pays and this process has paid already. The random-SIGKILL tests run the scripts
themselves through scripts/kill_test.py. Checkpoints are sharded (torch.distributed.checkpoint): the
2-process tests check that each rank wrote its own shards, that a 2-process run killed and resumed under
2 processes ends bit-identical to an uninterrupted 2-process run, that a checkpoint moves between 1 and 2
processes without changing a bit, and that no rank gathers a full state dict to save."""
import collections
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import kill_test as kt  # noqa: E402
import task  # noqa: E402
import train_utils as tu  # noqa: E402

STEPS = 4  # saves after steps 1, 2, 3 in the loop and a final one at 4


def _child(script: str, args: list, log: str, kill_at: str):
    sys.stdout = sys.stderr = open(log, "w", buffering=1)
    os.environ.pop("DVPO_KILL_AT", None)
    if kill_at:
        os.environ["DVPO_KILL_AT"] = kill_at
    checkpoint._fault_hits.clear()
    mod = importlib.import_module(script)
    mod.main(tu.parse_config(mod.Config, args))  # a SystemExit("message") exits 1 with the message on stderr


class Forked:
    """<script>.main(args) in a child forked from this process, output to `log`; .pid and .poll() as a Popen."""

    def __init__(self, script: str, args: list, log: str, kill_at: str = ""):
        open(log, "w").close()  # exists from the start: the caller may be watching it
        self.p = multiprocessing.get_context("fork").Process(target=_child, args=(script, args, log, kill_at))
        self.p.start()
        self.pid = self.p.pid

    def poll(self):
        return None if self.p.is_alive() else self.p.exitcode


def run_main(script: str, args: list, log: str, kill_at: str = "") -> tuple[int, str]:
    """(exit code, output) of a Forked run to its end; -9: it was SIGKILLed."""
    child = Forked(script, args, log, kill_at)
    child.p.join(300)
    assert child.poll() is not None, f"{script} {args} hung"
    return child.poll(), open(log).read()


def args_of(script: str, setup: dict, out: str, steps: int = STEPS) -> list:
    return kt.script_args(script + ".py", setup, out, steps)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return kt.tiny_setup(str(tmp_path_factory.mktemp("setup")))


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """Uninterrupted runs of STEPS steps: script -> out_dir."""
    refs = {}
    for script in ("dvpo", "ppo_baseline"):
        refs[script] = str(tmp_path_factory.mktemp(f"ref_{script}"))
        rc, log = run_main(script, args_of(script, setup, refs[script]), refs[script] + ".log")
        assert rc == 0, log[-3000:]
    return refs


def killed_then_resumed(script, setup, out, faults) -> str:
    """One run per fault (each must die by SIGKILL at it), then --resume auto to the end; the last log."""
    for i, fault in enumerate(faults):
        rc, log = run_main(script, args_of(script, setup, out) + ["--resume", "auto"], f"{out}.{i}.log", fault)
        assert rc == -signal.SIGKILL, f"{fault}: exit {rc}, expected a SIGKILL\n{log[-3000:]}"
    rc, log = run_main(script, args_of(script, setup, out) + ["--resume", "auto"], f"{out}.end.log")
    assert rc == 0, log[-3000:]
    return log


# the faults of successive runs (DVPO_KILL_AT=<point>:<n>) -> the step the last run resumes from
DVPO_FAULTS = {
    "weights": (["weights:3"], 2),  # checkpoint.tmp holds the weights, no trainer state
    "files": (["files:3"], 2),  # every file written and flushed, no manifest
    "manifest": (["manifest:3"], 3),  # checkpoint.tmp complete, not swapped in
    "delete": (["delete:2"], 3),  # the swap deleted 2 files of checkpoint.old (the ENOTEMPTY)
    "to_old": (["to_old:2"], 3),  # checkpoint -> checkpoint.old done, checkpoint.tmp -> checkpoint not
    "to_new": (["to_new:3"], 3),  # checkpoint.tmp -> checkpoint done
    "final": (["final:1"], 4),  # one final output file moved into out_dir
    # then killed three times more, inside start-up recovery: mid-delete, after each rename
    "recovery": (["manifest:3", "delete:1", "to_old:1", "to_new:1"], 3),
}


@pytest.mark.parametrize("case", sorted(DVPO_FAULTS))
def test_dvpo_killed_at_every_point_resumes_bit_exact(setup, reference, tmp_path, case):
    faults, resumed_at = DVPO_FAULTS[case]
    out = str(tmp_path / "run")
    log = killed_then_resumed("dvpo", setup, out, faults)
    assert f"resumed from {os.path.join(out, 'checkpoint')} at step {resumed_at}" in log
    assert kt.compare(out, reference["dvpo"], "dvpo.py", STEPS) == []


PPO_FAULTS = {"to_old": DVPO_FAULTS["to_old"], "delete": DVPO_FAULTS["delete"],
              "final": (["final:8"], 4)}  # the policy's 5 files, then 3 of the critic's


@pytest.mark.parametrize("case", sorted(PPO_FAULTS))
def test_ppo_baseline_killed_resumes_bit_exact(setup, reference, tmp_path, case):
    """Policy and critic (the frozen reward model is reward_model.py's, trained once before)."""
    faults, resumed_at = PPO_FAULTS[case]
    out = str(tmp_path / "run")
    log = killed_then_resumed("ppo_baseline", setup, out, faults)
    assert f"at step {resumed_at}" in log
    assert kt.compare(out, reference["ppo_baseline"], "ppo_baseline.py", STEPS) == []


@pytest.mark.parametrize("script", ["dvpo", "ppo_baseline"])
def test_random_sigkills(setup, tmp_path, script):
    """SIGKILLed 8 times at seeded random moments of its training (saves included), restarted with
    --resume auto each time (scripts/kill_test.py's loop, on forked runs): the uninterrupted run's final
    weights and metrics rows, bit for bit."""
    steps, kills = 12, 8
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    rc, log, _, d = kt.run_once(lambda extra, log: Forked(script, args_of(script, setup, ref, steps), log), [],
                                ref + ".log", None)
    assert rc == 0, log[-3000:]
    st = kt.run_with_kills(lambda extra, log: Forked(script, args_of(script, setup, out, steps) + extra, log), out,
                           kills, seed=0, window_s=2 * d / kills, log=lambda *a: None)
    assert st["kills"] == kills
    assert kt.compare(out, ref, script + ".py", steps) == []


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupted_checkpoint_falls_back_to_the_previous_one(setup, reference, tmp_path, damage):
    out = str(tmp_path / "run")
    killed_after_save_3 = run_main("dvpo", args_of("dvpo", setup, out), out + ".0.log", "to_new:3")[0]
    assert killed_after_save_3 == -signal.SIGKILL
    bad = os.path.join(out, "checkpoint", "__0_0.distcp" if damage == "truncate" else "trainer_state.pt")
    if damage == "truncate":
        os.truncate(bad, os.path.getsize(bad) // 2)
    else:
        os.remove(bad)
    rc, log = run_main("dvpo", args_of("dvpo", setup, out) + ["--resume", "auto"], out + ".1.log")
    assert rc == 0, log[-3000:]
    assert bad + (" has " if damage == "truncate" else " is missing") in log  # names the bad file
    assert f"checkpoint.old (complete, step 2) promoted to {os.path.join(out, 'checkpoint')}" in log
    assert "at step 2" in log
    assert kt.compare(out, reference["dvpo"], "dvpo.py", STEPS) == []


def test_no_usable_checkpoint_is_one_line_and_nonzero(setup, tmp_path):
    out = str(tmp_path / "run")
    assert run_main("dvpo", args_of("dvpo", setup, out), out + ".0.log", "to_new:1")[0] == -signal.SIGKILL
    bad = os.path.join(out, "checkpoint", "__0_0.distcp")  # rank 0's shards: here all the weights
    os.truncate(bad, 100)
    rows = open(os.path.join(out, "metrics.jsonl")).read()
    p = subprocess.run([sys.executable, "dvpo.py"] + args_of("dvpo", setup, out) + ["--resume", "yes"],
                       cwd=ROOT, env=kt.ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr  # the real script: one line
    assert bad in p.stderr and "no complete checkpoint to fall back to" in p.stderr
    rc, log = run_main("dvpo", args_of("dvpo", setup, out) + ["--resume", "auto"], out + ".1.log")
    assert rc == 1 and bad in log  # auto does not start over either: that would throw the run away
    assert os.path.getsize(bad) == 100 and open(os.path.join(out, "metrics.jsonl")).read() == rows  # untouched


def test_resume_flags_say_what_they_do(setup, tmp_path):
    out = str(tmp_path / "run")
    args = args_of("dvpo", setup, out, steps=2)
    rc, log = run_main("dvpo", args + ["--resume", "yes"], out + ".0.log")
    assert rc == 1 and "--resume yes: no checkpoint in" in log
    rc, log = run_main("dvpo", args + ["--resume", "auto"], out + ".1.log")
    assert rc == 0 and "--resume auto: no checkpoint in" in log and "starting fresh" in log
    rows = open(os.path.join(out, "metrics.jsonl")).read()
    rc, log = run_main("dvpo", args, out + ".2.log")  # --resume no (the default) over a checkpoint
    assert rc == 1 and "holds a checkpoint (step 2)" in log and "--resume auto" in log and "--overwrite" in log
    assert open(os.path.join(out, "metrics.jsonl")).read() == rows  # metrics kept
    rc, log = run_main("dvpo", args + ["--overwrite", "--resume", "auto"], out + ".3.log")
    assert rc == 1 and "contradicts --resume auto" in log
    rc, log = run_main("dvpo", args + ["--resume", "maybe"], out + ".4.log")
    assert rc == 1 and "--resume must be no, auto or yes" in log
    rc, log = run_main("dvpo", args + ["--overwrite"], out + ".5.log")
    assert rc == 0 and "--overwrite: removed" in log and "resumed" not in log
    assert [json.loads(r)["step"] for r in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]


def test_an_unsharded_checkpoint_of_the_older_layout_is_one_line_and_nonzero(setup, tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "checkpoint"))
    for name in ("model.safetensors", "trainer_state.pt"):  # the layout before sharded checkpoints
        open(os.path.join(out, "checkpoint", name), "wb").write(b"0" * 100)
    checkpoint.write_manifest(os.path.join(out, "checkpoint"), 2)
    rc, log = run_main("dvpo", args_of("dvpo", setup, out) + ["--resume", "auto"], out + ".log")
    assert rc == 1 and "(step 2) is an unsharded checkpoint" in log and "--overwrite" in log, log[-3000:]


def test_trim_metrics_drops_later_steps_and_a_partial_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    open(path, "w").write('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "kl": 0.')
    checkpoint.trim_metrics(path, 2)
    assert open(path).read() == '{"step": 1}\n{"step": 2}\n'
    open(path, "w").write('{"step": 1}\n{"step": 2, "kl": 0.')  # killed while appending the checkpoint's own row
    checkpoint.trim_metrics(path, 2)
    assert open(path).read() == '{"step": 1}\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dvpo_resume_under_torchrun(setup, tmp_path):
    """Rank 0 SIGKILLed after its first save under torchrun (2 processes, FSDP2, gloo); the restart
    resumes: rank 0 recovers, every rank loads its shards of the weights and the optimizer state, and
    training continues to the requested step count."""
    out = str(tmp_path / "r2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "dvpo.py"]
    args = args_of("dvpo", setup, out, steps=2)
    for kill_at, resume in (("to_new:1", "auto"), ("", "yes")):
        p = subprocess.run(cmd[:5] + ["--master_port", str(free_port())] + cmd[5:] + args + ["--resume", resume],
                           cwd=ROOT, env=dict(kt.ENV, DVPO_KILL_AT=kill_at), capture_output=True, text=True,
                           timeout=300)
        assert (p.returncode != 0) == bool(kill_at), p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout and "at step 1" in p.stdout
    assert json.load(open(os.path.join(out, "summary.json")))["train/steps"] == 2
    assert [json.loads(r)["step"] for r in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    assert not torch.equal(load_file(os.path.join(out, "model.safetensors"))["lm_head.weight"],
                           load_file(os.path.join(setup["sft"], "model.safetensors"))["lm_head.weight"])


def torchrun(script: str, args: list, log: str, kill_at: str = "", nproc: int = 2) -> tuple[int, str]:
    """(exit code, output) of `torchrun --nproc_per_node nproc <script> args`, DVPO_KILL_AT=kill_at on every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), script] + args
    p = subprocess.run(cmd, cwd=ROOT, env=dict(kt.ENV, DVPO_KILL_AT=kill_at), capture_output=True, text=True,
                       timeout=300)
    open(log, "w").write(p.stdout + p.stderr)
    return p.returncode, p.stdout + p.stderr


# 2 processes: DVPO with τ (each rank's τ pool is its own batch: the checkpoint keeps every rank's `state`),
# killed on every rank once save 3 has written its shards; PPO (policy and critic) with rank 0 killed
# between the renames of save 3 while rank 1 waits in a barrier (torchrun then stops it). Each entry: extra
# arguments, DVPO_KILL_AT, what the kill leaves on disk, the step the restart resumes from
TWO_PROCESS = {"dvpo": (["--tau_k", "2"], "weights:3", "checkpoint=2 checkpoint.old=1 checkpoint.tmp=incomplete", 2),
               "ppo_baseline": ([], "to_old:2", "checkpoint.old=2 checkpoint.tmp=3", 3)}


@pytest.fixture(scope="module")
def reference2(setup, tmp_path_factory):
    """Uninterrupted 2-process runs of STEPS steps: script -> out_dir."""
    refs = {}
    for script, (extra, *_) in TWO_PROCESS.items():
        refs[script] = str(tmp_path_factory.mktemp(f"ref2_{script}"))
        rc, log = torchrun(script + ".py", args_of(script, setup, refs[script]) + extra, refs[script] + ".log")
        assert rc == 0, log[-3000:]
    return refs


def shard_files(folder: str) -> dict:
    """DCP's index of a checkpoint folder: tensor name -> the files its pieces are in."""
    files = collections.defaultdict(set)
    for index, info in FileSystemReader(folder).read_metadata().storage_data.items():
        files[index.fqn].add(info.relative_path)
    return files


@pytest.mark.parametrize("script", sorted(TWO_PROCESS))
def test_two_processes_killed_resume_bit_exact_and_each_rank_writes_its_shards(setup, reference2, tmp_path, script):
    extra, kill_at, left_on_disk, resumed_at = TWO_PROCESS[script]
    out = str(tmp_path / "run")
    rc, log = torchrun(script + ".py", args_of(script, setup, out) + extra + ["--resume", "auto"], out + ".0.log",
                       kill_at)
    assert rc != 0 and kt.disk_state(out) == left_on_disk, (kt.disk_state(out), log[-3000:])
    rc, log = torchrun(script + ".py", args_of(script, setup, out) + extra + ["--resume", "auto"], out + ".1.log")
    assert rc == 0 and f"resumed from {os.path.join(out, 'checkpoint')} at step {resumed_at}" in log, log[-3000:]
    assert kt.compare(out, reference2[script], script + ".py", STEPS) == []
    ckpt = os.path.join(out, "checkpoint")
    assert sorted(os.listdir(ckpt)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json",
                                        "trainer_state.pt"]
    assert set(json.load(open(os.path.join(ckpt, "manifest.json")))["files"]) == set(os.listdir(ckpt)) - {
        "manifest.json"}
    files = shard_files(ckpt)
    weights = [k for k in files if k.split(".")[1] == "model"]  # every weight of every trained model (not "optim")
    assert {k.split(".")[0] for k in weights} == ({"policy", "critic"} if script == "ppo_baseline" else {"policy"})
    for k in weights:  # FSDP2 shards every weight on dim 0: each rank wrote its own half, in its own file
        assert files[k] == {"__0_0.distcp", "__1_0.distcp"}, (k, files[k])


def full_checkpoint(folder: str, tmp_file: str) -> dict:
    """Every tensor and value of a DCP checkpoint, unsharded, flat ("policy.optim.state.<name>.exp_avg": ...)."""
    dcp_to_torch_save(folder, tmp_file)
    flat, todo = {}, list(torch.load(tmp_file, weights_only=False).items())
    while todo:
        k, v = todo.pop()
        if isinstance(v, (dict, list)):
            todo += [(f"{k}.{i}", x) for i, x in (v.items() if isinstance(v, dict) else enumerate(v))]
        else:
            flat[k] = v
    return flat


@pytest.mark.parametrize("saved, loaded", [(1, 2), (2, 1)])
def test_a_checkpoint_moves_between_process_counts_without_changing_a_bit(setup, reference, reference2, tmp_path,
                                                                          saved, loaded):
    """DCP reshards: a checkpoint saved by `saved` processes, loaded by `loaded` (every weight and every
    optimizer state) and saved again, holds the same bits."""
    src = os.path.join((reference if saved == 1 else reference2)["dvpo"], "checkpoint")
    dst = str(tmp_path / "checkpoint")
    rc, log = torchrun("tests/dist_checkpoint.py", [setup["sft"], src, dst], str(tmp_path / "log"), nproc=loaded)
    assert rc == 0 and f"saved at world size {saved}, resumed at {loaded}" in log, log[-3000:]
    assert len(os.listdir(dst)) == 3 + loaded  # .metadata, one shard file per rank, trainer state, manifest
    a, b = full_checkpoint(src, str(tmp_path / "a.pt")), full_checkpoint(dst, str(tmp_path / "b.pt"))
    assert a.keys() == b.keys() and any(".optim.state." in k for k in a)
    assert [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])] == []


def test_a_two_process_run_resumes_under_one_process(setup, reference2, tmp_path):
    """The scripts themselves: a 2-process run's checkpoint (step 4) resumed by `python dvpo.py` (one
    process) at its last step writes the same final weights as the 2-process run."""
    out = str(tmp_path / "run")
    shutil.copytree(reference2["dvpo"], out)
    rc, log = run_main("dvpo", args_of("dvpo", setup, out) + ["--resume", "yes"], out + ".log")
    assert rc == 0 and "saved at world size 2, resumed at 1: resharded" in log and "at step 4" in log, log[-3000:]
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(reference2["dvpo"],
                                                                                     "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset: Linux only")
def test_a_save_gathers_no_full_state_dict(tmp_path):
    """A 64 MiB model (fp32) and its AdamW under 2 processes: saving a training checkpoint raises no
    rank's peak RSS by more than a quarter of the model (measured: under 3 MiB; the rank-0 gather it
    replaces raised rank 0's by the whole model and optimizer state, 3x the model)."""
    tok = task.build_char_tokenizer()
    task.build_tiny_model(tok, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                          num_attention_heads=8).save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    rc, log = torchrun("tests/dist_checkpoint.py", [str(tmp_path / "m"), "", str(tmp_path / "checkpoint")],
                       str(tmp_path / "log"))
    assert rc == 0, log[-3000:]
    ranks = [json.loads(line) for line in log.splitlines() if line.startswith('{"rank"')]
    assert len(ranks) == 2 and ranks[0]["full_model_mib"] > 60, ranks
    for r in ranks:
        assert r["save_rise_mib"] < r["full_model_mib"] / 4, ranks
