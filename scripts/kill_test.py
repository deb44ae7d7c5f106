"""scripts/kill_test.py — does a run survive SIGKILL at any moment? (docs/checkpoints.md)

Runs dvpo.py or ppo_baseline.py with --save_every 1 on a tiny built-in setup, kills it with SIGKILL at
random moments and restarts it with --resume auto after each kill until it completes, then checks that
  - its final weights equal an uninterrupted run's bit for bit (ppo_baseline.py: policy and critic),
  - metrics.jsonl has exactly one row per step, each equal to the uninterrupted run's (timings aside).
Prints the kills, the restarts, what each kill left on disk, and the wall time; exits 1 on a mismatch.

  python scripts/kill_test.py --script dvpo.py --kills 30
  python scripts/kill_test.py --script ppo_baseline.py --kills 30 --steps 40 --seed 1

Setup (built in a temp folder, nothing downloaded): the tests' tiny Llama (char tokenizer) as the SFT
policy, a GVM trained on it by gvm.py, and reward_model.py's reward model trained on the GVM's pairs (the
critic starts from it). One CPU thread.
Kill moments: each run is killed a delay after it reports that training started (its "before:" line),
the delay uniform in [0, 2 D / kills] from random.Random(--seed), D being the uninterrupted run's time
from that line to its exit; after --kills kills the run is left to finish (see run_with_kills). The
delays are seeded; where they land (mid-step, mid-save, mid-deletion, ...) depends on timing, so each
run is a new sample. Kills during start-up (imports, recovery) are left to tests/test_checkpoint.py.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
MARKER = b"before:"  # printed by both scripts once training starts (fresh or resumed)
TIMING_KEYS = ("time/", "tokens_per_s", "memory/")  # metrics that differ between identical runs

import torch  # noqa: E402  (after the path set-up: the repo's modules are imported from ROOT)
from safetensors.torch import load_file  # noqa: E402

import checkpoint  # noqa: E402
import task  # noqa: E402


def tiny_setup(folder: str) -> dict:
    """The tiny SFT policy, a GVM trained on it, and a reward model trained on the GVM's pairs."""
    sft, gvm, rm = os.path.join(folder, "sft"), os.path.join(folder, "gvm"), os.path.join(folder, "rm")
    tok = task.build_char_tokenizer()
    task.build_tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2).save_pretrained(sft)
    tok.save_pretrained(sft)
    subprocess.run([sys.executable, "gvm.py", "--model", sft, "--out_dir", gvm, "--builtin_prompts", "48",
                    "--builtin_eval_prompts", "8", "--batch_size", "8", "--epochs", "1", "--lr", "1e-3",
                    "--warmup_steps", "1"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    subprocess.run([sys.executable, "reward_model.py", "--model", sft, "--out_dir", rm, "--data",
                    os.path.join(gvm, "pairs_train.jsonl"), "--eval_data", os.path.join(gvm, "pairs_eval.jsonl"),
                    "--epochs", "1", "--batch_size", "8"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    return {"sft": sft, "gvm": gvm, "rm": rm}


def script_args(script: str, setup: dict, out_dir: str, steps: int) -> list[str]:
    """Command-line arguments (after the script name) of a tiny run that saves after every step."""
    common = ["--model", setup["sft"], "--out_dir", out_dir, "--steps", str(steps), "--batch_size", "8",
              "--minibatch_size", "4", "--micro_batch_size", "2", "--ppo_epochs", "2", "--eval_prompts", "8",
              "--max_new_tokens", "8", "--warmup_steps", "1", "--save_every", "1"]
    if script == "dvpo.py":
        return common + ["--gvm", setup["gvm"]]
    return common + ["--reward", "rm:" + setup["rm"]]


def disk_state(out_dir: str) -> str:
    """What is on disk, e.g. 'checkpoint=3 checkpoint.old=2 checkpoint.tmp=incomplete'."""
    names = [os.path.basename(p) for p in (os.path.join(out_dir, "checkpoint" + s) for s in checkpoint.SUFFIXES)
             if os.path.lexists(p)]
    st = {n: checkpoint.checkpoint_status(os.path.join(out_dir, n)) for n in names}
    return " ".join(f"{n}={v if isinstance(v, int) else 'incomplete'}" for n, v in st.items()) or "no checkpoint"


def subprocess_starter(cmd: list[str]):
    """start(extra_args, log) for run_with_kills: `cmd + extra_args` as a new process, output to log."""
    def start(extra: list[str], log: str):
        with open(log, "w") as f:
            return subprocess.Popen(cmd + extra, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    return start


def run_once(start, extra: list[str], log: str, kill_after: float | None) -> tuple[int, str, bool, float]:
    """Start a run (start(extra, log) returns an object with .pid and .poll()); if kill_after is set,
    SIGKILL it that many seconds after it prints MARKER, if it is still running. Returns (exit code,
    output, killed, seconds from MARKER to exit)."""
    proc, killed = start(extra, log), False
    while proc.poll() is None and MARKER not in open(log, "rb").read():
        time.sleep(0.005)
    t_marker = time.time()
    if kill_after is not None:
        time.sleep(kill_after)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
    while proc.poll() is None:
        time.sleep(0.005)
    return proc.poll(), open(log, errors="replace").read(), killed, time.time() - t_marker


def run_with_kills(start, out_dir: str, kills: int, seed: int, window_s: float, log=print) -> dict:
    """Run start(["--resume", "auto"], log) again and again, SIGKILLing each run a delay uniform in
    [0, window_s] after it starts training, until `kills` kills have landed and a run then exits 0. (A run
    that completes before all kills landed is simply restarted: it resumes at the last step and redoes
    the final evaluation and outputs, a restart a job scheduler may well do.) Returns counts: kills, runs,
    resumed steps, what each kill left on disk, wall time."""
    rng, stats = random.Random(seed), {"kills": 0, "runs": 0, "resumed_at": [], "states": collections.Counter(),
                                       "recovery_lines": 0}
    t0, rc = time.time(), None
    while stats["kills"] < kills or rc != 0:
        delay = rng.uniform(0, window_s) if stats["kills"] < kills else None
        rc, out, killed, _ = run_once(start, ["--resume", "auto"], f"{out_dir}.{stats['runs']}.log", delay)
        stats["runs"] += 1
        stats["resumed_at"] += [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", out)]
        stats["recovery_lines"] += out.count("checkpoint recovery:") + out.count("promoted to")
        if killed:
            stats["kills"] += 1
            state = disk_state(out_dir)
            stats["states"][re.sub(r"=\d+", "=k", state)] += 1
            log(f"kill {stats['kills']} after {delay:.3f}s: {state}")
        if rc not in (0, -signal.SIGKILL):
            raise RuntimeError(f"a run failed (exit {rc}):\n{out[-3000:]}")
    stats["wall_s"] = time.time() - t0
    return stats


def compare(out_dir: str, ref_dir: str, script: str, steps: int) -> list[str]:
    """Differences between a killed-and-resumed run and the uninterrupted one (empty: none)."""
    problems = []
    files = ["model.safetensors"] + (["critic/model.safetensors", "critic/value_head.safetensors"]
                                     if script == "ppo_baseline.py" else [])
    for f in files:
        a, b = load_file(os.path.join(out_dir, f)), load_file(os.path.join(ref_dir, f))
        if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            problems.append(f"{f} differs from the uninterrupted run's")
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    ref = [json.loads(line) for line in open(os.path.join(ref_dir, "metrics.jsonl"))]
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps {[r['step'] for r in rows]}, expected 1..{steps} once each")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)}  # noqa: E731
    if [strip(r) for r in rows] != [strip(r) for r in ref]:
        problems.append("metrics.jsonl rows differ from the uninterrupted run's")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--script", default="dvpo.py", choices=["dvpo.py", "ppo_baseline.py"])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    ap.add_argument("--work", default="", help="folder for the setup and the runs (default: a temp folder)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="kill_test_")
    print(f"work folder {work}")
    setup = tiny_setup(work)
    ref, out = os.path.join(work, "uninterrupted"), os.path.join(work, "killed")
    t0 = time.time()
    start = subprocess_starter([sys.executable, args.script] + script_args(args.script, setup, ref, args.steps))
    rc, log, _, d = run_once(start, [], ref + ".log", None)
    if rc != 0:
        sys.exit(f"the uninterrupted run failed:\n{log[-3000:]}")
    print(f"uninterrupted run: {time.time() - t0:.1f}s, {d:.2f}s of it after {MARKER.decode()!r}; "
          f"kill delays uniform in [0, {2 * d / args.kills:.3f}]s")
    start = subprocess_starter([sys.executable, args.script] + script_args(args.script, setup, out, args.steps))
    st = run_with_kills(start, out, args.kills, args.seed, 2 * d / args.kills)
    problems = compare(out, ref, args.script, args.steps)
    print(f"{args.script}: {st['kills']} SIGKILLs, {st['runs']} runs ({st['runs'] - 1} restarts), "
          f"{st['wall_s']:.0f}s wall; resumed at steps {st['resumed_at']}; {st['recovery_lines']} recovery messages")
    print("left on disk by the kills:")
    for state, n in st["states"].most_common():
        print(f"  {n:3d}  {state}")
    rows = sum(1 for _ in open(os.path.join(out, "metrics.jsonl")))
    print(f"metrics.jsonl: {rows} rows for {args.steps} steps; final weights "
          + ("bit-identical to the uninterrupted run's" if not problems else "DIFFER"))
    for p in problems:
        print(f"MISMATCH: {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
