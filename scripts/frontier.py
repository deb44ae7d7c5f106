"""scripts/frontier.py — DVPO vs PPO compared fairly: held-out gold reward against KL to the
reference, the frontier on which RLHF optimizers are compared (Gao et al. 2022, "Scaling laws for
reward model overoptimization"), on the built-in task.

For each method (ppo, dvpo_td, dvpo_paper), KL coefficient β (--betas), seed (--seeds) and run length
(--steps), one run of `ppo_baseline.py` or `dvpo.py`: the same SFT policy (out/sft), the
same preference pairs (out/gvm's pairs; the reward model is trained on them once, into
out/frontier/rm), the same hyperparameters and budget, rewards on a unit scale for both (the
default --normalize_reward, docs/algorithm.md §7). Every random draw of a run derives from its seed.
Runs go --jobs at a time with one thread each; a run whose summary.json exists is skipped, so an
interrupted sweep continues where it stopped.

Writes out/frontier/frontier.json (one row per run, and per (method, β, steps) the mean ± stderr over
seeds), out/frontier/frontier.png (gold reward vs KL, one colour per method, error bars over seeds,
40 and 120 steps as dashed and solid lines) and out/frontier/value_drift.png (per step, the rank
correlation between the frozen value model's score and the gold reward of that step's rollouts, and
the rollouts' gold reward next to the frozen model's score). Plotting needs matplotlib
(requirements-dev.txt); the runs do not.

  python sft.py && python gvm.py && python scripts/frontier.py   # the sweep (hours on a 2-core CPU)
  python scripts/frontier.py --plot_only                         # tables and pictures from the runs
  python scripts/frontier.py --methods dvpo_td --betas 0.1 --seeds 0 --steps 40   # one run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"ppo": ["ppo_baseline.py"], "dvpo_td": ["dvpo.py", "--advantage", "td"],
           "dvpo_paper": ["dvpo.py", "--advantage", "paper"]}
COLORS = {"ppo": "tab:blue", "dvpo_td": "tab:orange", "dvpo_paper": "tab:green"}
LABELS = {"ppo": "PPO (RM + critic)", "dvpo_td": "DVPO, td advantages", "dvpo_paper": "DVPO, paper advantages"}


def run_dir(out: str, method: str, beta: float, seed: int, steps: int) -> str:
    return os.path.join(out, "runs", f"{method}_b{beta:g}_n{steps}_s{seed}")


def run_one(out: str, method: str, beta: float, seed: int, steps: int, extra: list) -> float:
    """One training run in its own process (one thread); returns its wall time (0 if already done)."""
    d = run_dir(out, method, beta, seed, steps)
    if os.path.exists(os.path.join(d, "summary.json")):
        return 0.0
    os.makedirs(d, exist_ok=True)
    cmd = [sys.executable] + METHODS[method] + ["--kl_beta", str(beta), "--seed", str(seed), "--steps", str(steps),
                                               "--out_dir", d, "--save_every", "0"] + extra
    if method == "ppo":
        cmd += ["--rm", os.path.join(out, "rm")]
    t0 = time.time()
    with open(os.path.join(d, "log.txt"), "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}); see {d}/log.txt")
    return time.time() - t0


def collect(out: str, methods, betas, seeds, steps) -> dict:
    """Every finished run's numbers, and per (method, β, steps) the mean ± stderr over seeds."""
    rows = []
    for m in methods:
        for b in betas:
            for n in steps:
                for s in seeds:
                    d = run_dir(out, m, b, s, n)
                    if not os.path.exists(os.path.join(d, "summary.json")):
                        continue
                    x = json.load(open(os.path.join(d, "summary.json")))
                    last = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))][-1]
                    rows.append({"method": m, "beta": b, "steps": n, "seed": s,
                                 "gold": x["eval/reward_after"], "gold_stderr": x["eval/reward_stderr"],
                                 "gold_greedy": x["eval/reward_greedy_after"], "gold_before": x["eval/reward_before"],
                                 "kl": x["eval/kl_to_ref"], "kl_stderr": x["eval/kl_to_ref_stderr"],
                                 "seconds": x["train/seconds"],
                                 "final_reward_corr": last.get("gvm/reward_corr",  # absent: undefined that step
                                                               last.get("rm/reward_corr", math.nan))})
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["beta"], r["steps"]), []).append(r)
    mean_se = lambda xs: (statistics.mean(xs), statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)
    points = []
    for (m, b, n), g in sorted(groups.items()):
        p = {"method": m, "beta": b, "steps": n, "seeds": len(g)}
        for k in ("gold", "gold_greedy", "kl", "seconds", "final_reward_corr"):
            p[k], p[k + "_se"] = mean_se([r[k] for r in g])
        points.append(p)
    acc = {}
    for name, path, key in (("gvm", "out/gvm/summary.json", "eval/pairwise_accuracy"),
                            ("rm", os.path.join(out, "rm", "rm_config.json"), "rm/pairwise_accuracy"),
                            ("gold_ceiling", "out/gvm/summary.json", "eval/gold_pairwise_accuracy")):
        if os.path.exists(os.path.join(ROOT, path)):
            acc[name] = json.load(open(os.path.join(ROOT, path)))[key]
    return {"runs": rows, "points": points, "pairwise_accuracy": acc}


def table(res: dict) -> str:
    out = ["| method | β | steps | KL to ref | gold (sampled) | gold (greedy) | final corr | s/run | seeds |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        out.append(f"| {p['method']} | {p['beta']:g} | {p['steps']} | {p['kl']:.2f} ± {p['kl_se']:.2f} | "
                   f"{p['gold']:.3f} ± {p['gold_se']:.3f} | {p['gold_greedy']:.3f} ± {p['gold_greedy_se']:.3f} | "
                   f"{p['final_reward_corr']:.2f} | {p['seconds']:.0f} | {p['seeds']} |")
    return "\n".join(out)


def plot(res: dict, out: str, drift_beta: float | None):
    import matplotlib  # optional (requirements-dev.txt): only the pictures need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    for ax, key, title in ((axes[0], "gold", "sampled at T = 1"), (axes[1], "gold_greedy", "greedy")):
        for m in COLORS:
            for n, style in ((40, "--"), (120, "-")):
                ps = sorted((p for p in res["points"] if p["method"] == m and p["steps"] == n), key=lambda p: p["kl"])
                if not ps:
                    continue
                ax.errorbar([p["kl"] for p in ps], [p[key] for p in ps], xerr=[p["kl_se"] for p in ps],
                            yerr=[p[key + "_se"] for p in ps], color=COLORS[m], ls=style,
                            marker="o" if n == 120 else "s",
                            mfc=COLORS[m] if n == 120 else "white", capsize=2, label=f"{LABELS[m]}, {n} steps")
                for p in ps:
                    ax.annotate(f"{p['beta']:g}", (p["kl"], p[key]), textcoords="offset points", xytext=(3, -9),
                                fontsize=6, color=COLORS[m])
        before = [r["gold_before"] for r in res["runs"]] if key == "gold" else []
        if before:
            ax.axhline(statistics.mean(before), color="gray", lw=0.8, ls=":", label="SFT policy (before RL)")
        ax.set_xscale("log")
        ticks = [0.1, 0.2, 0.5, 1, 2, 5, 10]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("KL to the reference, nats per response (held-out)")
        ax.set_ylabel("held-out gold reward")
        ax.set_title(f"gold reward vs KL, {title} (labels: β)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=130)
    if drift_beta is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for m in COLORS:
        curves = {}
        for r in res["runs"]:
            if r["method"] == m and r["beta"] == drift_beta and r["steps"] == max(p["steps"] for p in res["points"]):
                d = run_dir(out, m, r["beta"], r["seed"], r["steps"])
                curves[r["seed"]] = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
        if not curves:
            continue
        n = min(len(c) for c in curves.values())
        mean = lambda k: [statistics.mean(c[i].get(k, math.nan) for c in curves.values()) for i in range(n)]
        steps = list(range(1, n + 1))
        corr = "rm/reward_corr" if m == "ppo" else "gvm/reward_corr"
        axes[0].plot(steps, mean(corr), color=COLORS[m], label=LABELS[m])
        axes[1].plot(steps, mean("reward"), color=COLORS[m], label=f"{LABELS[m]}: gold reward")
        score = "rm/score" if m == "ppo" else "gvm/return"
        axes[1].plot(steps, mean(score), color=COLORS[m], ls=":", label=f"{LABELS[m]}: frozen model's score")
    axes[0].set_title(f"rank corr(frozen model's score, gold) of each step's rollouts, β = {drift_beta:g}", fontsize=9)
    axes[1].set_title("each step's rollouts: gold reward (solid), frozen model's unit-scale score (dotted)",
                      fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "value_drift.png"), dpi=130)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/frontier")
    ap.add_argument("--methods", default="ppo,dvpo_td,dvpo_paper")
    ap.add_argument("--betas", default="0.003,0.01,0.03,0.1,0.3,1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", default="40,120")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--drift_beta", type=float, default=None, help="β of the value-drift picture (default: middle)")
    ap.add_argument("--plot_only", action="store_true")
    ap.add_argument("extra", nargs="*", help="extra flags for every run, after --")
    a = ap.parse_args()
    methods, seeds = a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    betas, steps = [float(b) for b in a.betas.split(",")], [int(n) for n in a.steps.split(",")]
    out = os.path.join(ROOT, a.out)
    os.makedirs(out, exist_ok=True)
    if not a.plot_only:
        for need, cmd in (("out/sft", "python sft.py"), ("out/gvm/gvm_config.json", "python gvm.py")):
            if not os.path.exists(os.path.join(ROOT, need)):
                sys.exit(f"frontier.py: {need} is missing; run `{cmd}` first")
        t0 = time.time()
        if "ppo" in methods and not os.path.exists(os.path.join(out, "rm", "rm_config.json")):
            subprocess.run([sys.executable, "reward_model.py", "--out_dir", os.path.join(out, "rm")], cwd=ROOT,
                           check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        todo = [(m, b, s, n) for n in steps for s in seeds for b in betas for m in methods]
        print(f"{len(todo)} runs, {a.jobs} at a time -> {out}/runs", flush=True)
        with ThreadPoolExecutor(a.jobs) as pool:
            for i, dt in enumerate(pool.map(lambda x: run_one(out, *x, a.extra), todo)):
                print(f"[{i + 1}/{len(todo)}] {todo[i]} {dt:.0f} s | {time.time() - t0:.0f} s so far", flush=True)
        print(f"sweep wall time {time.time() - t0:.0f} s")
    res = collect(out, methods, betas, seeds, steps)
    res["config"] = vars(a)
    with open(os.path.join(out, "frontier.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    print("pairwise accuracy on the same held-out pairs:", res["pairwise_accuracy"])
    mid = betas[len(betas) // 2] if a.drift_beta is None else a.drift_beta
    plot(res, out, mid)
    print(f"-> {out}/frontier.json, frontier.png, value_drift.png")


if __name__ == "__main__":
    main()
