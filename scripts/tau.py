"""scripts/tau.py — what trajectory conditioning τ does, measured (docs/algorithm.md §8, §11).

For each task, τ size K (--ks) and seed: one GVM (`gvm.py --tau_k K`, pairs sampled from out/sft by
the task's samplers, every draw from the seed), then one DVPO run with that GVM (`dvpo.py`, same seed).
  default: samplers T1.0, T1.5 (the built-in task's GVM): the two policies differ everywhere.
  late   : samplers T1.0, T1.0+late0.5: identical on early tokens, one slips in the second half of
           the response, so the value of a prefix depends on which policy will complete it — the
           case τ is for (τ shows the GVM the completing policy; K = 0 can only average over both).
Reported per (task, K), mean ± std over seeds: held-out pairwise accuracy (terminal value), the
return-to-go rank correlation (all, per position, per sampler), held-out TD loss, GVM context length,
training seconds, and the DVPO result (held-out gold reward, KL to ref). Runs go --jobs at a time,
one thread each; finished runs are skipped. Writes out/tau/tau.json, out/tau/table.md, out/tau/tau.png.

  python sft.py && python scripts/tau.py              # the whole ablation (hours on a 2-core CPU)
  python scripts/tau.py --plot_only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {"default": "T1.0,T1.5", "late": "T1.0,T1.0+late0.5"}


def run(cmd: list, out_dir: str) -> float:
    """One script run in its own process (one thread), skipped if its summary.json exists."""
    if os.path.exists(os.path.join(out_dir, "summary.json")):
        return 0.0
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        p = subprocess.run([sys.executable] + cmd + ["--out_dir", out_dir], cwd=ROOT, stdout=log,
                           stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {out_dir}/log.txt")
    return time.time() - t0


def job(out: str, task: str, k: int, seed: int, extra: list, dvpo_flags: list) -> float:
    """The GVM of (task, K, seed), then DVPO with it."""
    g = os.path.join(out, f"gvm_{task}_k{k}_s{seed}")
    dt = run(["gvm.py", "--tau_k", str(k), "--builtin_samplers", TASKS[task], "--seed", str(seed)] + extra, g)
    return dt + run(["dvpo.py", "--gvm", g, "--seed", str(seed)] + dvpo_flags,
                    os.path.join(out, f"dvpo_{task}_k{k}_s{seed}"))


def collect(out: str, tasks, ks, seeds) -> dict:
    rows = []
    for task in tasks:
        for k in ks:
            for s in seeds:
                g, d = (os.path.join(out, f"{x}_{task}_k{k}_s{s}", "summary.json") for x in ("gvm", "dvpo"))
                if os.path.exists(g) and os.path.exists(d):
                    rows.append({"task": task, "k": k, "seed": s, **json.load(open(g)),
                                 **{f"dvpo/{key}": v for key, v in json.load(open(d)).items()}})
    keys = ["eval/pairwise_accuracy", "eval/rtg_corr", "eval/rtg_corr/early", "eval/rtg_corr/middle",
            "eval/rtg_corr/late", "eval/rtg_mse", "eval/td_loss", "train/seconds", "dvpo/eval/reward_after",
            "dvpo/eval/kl_to_ref"]
    points = []
    for task in tasks:
        for k in ks:
            g = [r for r in rows if r["task"] == task and r["k"] == k]
            if not g:
                continue
            p = {"task": task, "k": k, "seeds": len(g)}
            for key in keys + sorted({x for r in g for x in r if x.startswith("eval/rtg_corr/sft@")}):
                xs = [r[key] for r in g if key in r]
                p[key] = (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
            points.append(p)
    return {"runs": rows, "points": points}


def table(res: dict) -> str:
    f = lambda p, k, d=3: f"{p[k][0]:.{d}f} ± {p[k][1]:.{d}f}" if k in p else "–"  # noqa: E731
    out = ["| task | K | pairwise acc | rtg corr (all) | early | middle | late | TD loss | DVPO gold | DVPO KL | "
           "GVM s | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        out.append(f"| {p['task']} | {p['k']} | {f(p, 'eval/pairwise_accuracy')} | {f(p, 'eval/rtg_corr')} | "
                   f"{f(p, 'eval/rtg_corr/early')} | {f(p, 'eval/rtg_corr/middle')} | {f(p, 'eval/rtg_corr/late')} | "
                   f"{f(p, 'eval/td_loss', 4)} | {f(p, 'dvpo/eval/reward_after')} | {f(p, 'dvpo/eval/kl_to_ref', 2)} | "
                   f"{p['train/seconds'][0]:.0f} | {p['seeds']} |")
    return "\n".join(out)


def plot(res: dict, path: str):
    import matplotlib  # optional (requirements-dev.txt): only the picture needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("eval/rtg_corr", "return-to-go rank corr, all states"), ("eval/rtg_corr/early", "… early states"),
              ("eval/pairwise_accuracy", "held-out pairwise accuracy (w_T)"), ("dvpo/eval/reward_after",
                                                                                "DVPO held-out gold reward"))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for task, color in (("default", "tab:blue"), ("late", "tab:red")):
            ps = [p for p in res["points"] if p["task"] == task and key in p]
            ax.errorbar([p["k"] for p in ps], [p[key][0] for p in ps], yerr=[p[key][1] for p in ps], color=color,
                        marker="o", capsize=3, label=f"{task} samplers ({TASKS[task]})")
        ax.set_xlabel("τ trajectories K")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/tau")
    ap.add_argument("--tasks", default="default,late")
    ap.add_argument("--ks", default="0,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--dvpo_flags", default="", help="extra dvpo.py flags, e.g. '--kl_beta 0.1'")
    ap.add_argument("--plot_only", action="store_true")
    ap.add_argument("extra", nargs="*", help="extra gvm.py flags, after --")
    a = ap.parse_args()
    tasks, ks, seeds = a.tasks.split(","), [int(k) for k in a.ks.split(",")], [int(s) for s in a.seeds.split(",")]
    out = os.path.join(ROOT, a.out)
    if not a.plot_only:
        if not os.path.exists(os.path.join(ROOT, "out/sft")):
            sys.exit("tau.py: out/sft is missing; run `python sft.py` first")
        todo = [(t, k, s) for s in seeds for k in sorted(ks, reverse=True) for t in tasks]  # long jobs first
        t0 = time.time()
        with ThreadPoolExecutor(a.jobs) as pool:
            for i, dt in enumerate(pool.map(lambda x: job(out, *x, a.extra, a.dvpo_flags.split()), todo)):
                print(f"[{i + 1}/{len(todo)}] {todo[i]} {dt:.0f} s | {time.time() - t0:.0f} s so far", flush=True)
        print(f"ablation wall time {time.time() - t0:.0f} s")
    res = collect(out, tasks, ks, seeds)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tau.json"), "w") as f:
        json.dump(res, f, indent=1)
    open(os.path.join(out, "table.md"), "w").write(table(res) + "\n")
    print(table(res))
    plot(res, os.path.join(out, "tau.png"))
    print(f"-> {out}/tau.json, table.md, tau.png")


if __name__ == "__main__":
    main()
