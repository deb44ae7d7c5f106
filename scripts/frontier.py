"""scripts/frontier.py — DVPO against the paper's other baselines and the controls that explain it: held-out
gold reward against KL to the reference, the frontier on which RLHF optimizers are compared (Gao et al.
2022, "Scaling laws for reward model overoptimization"), on the built-in task (docs/algorithm.md §12).

The grid (reward source × advantage estimator), every cell one flag of an existing script:

    reward ↓ / estimator →   learned critic + GAE        group of n samples          frozen GVM chain
    Bradley-Terry RM score   ppo (critic from the RM)     grpo, rloo (remax, dr_grpo)  -
    GVM terminal value w_T   ppo_gvm (critic from GVM)    grpo_gvm                     dvpo
  and the critic control ppo_gvmcritic (RM reward, critic pretrained as the GVM), and dpo (offline, no RL,
  over its own β). Equal samples per step (DVPO and PPO: 64 prompts × 1 response; the group methods:
  16 prompts × 4), equal optimizer steps, the same SFT policy (out/sft), the same preference pairs (out/gvm's;
  the reward model is trained on them once, into <out>/rm), rewards on a unit scale for every method
  (docs/algorithm.md §7). Every random draw of a run derives from its seed. Runs go --jobs at a time with
  one thread each; a run whose summary.json exists is skipped, so an interrupted sweep continues.

Writes <out>/frontier.json (every run, and per (method, β, steps) the mean ± stderr over seeds),
<out>/frontier.png (gold vs KL, one colour per method, 40 and 120 steps dashed and solid; DPO as points),
<out>/value_drift.png (per step: the rank correlation of the frozen scorer with gold over the batch, and
within the groups of one prompt's samples) and <out>/matched_kl.md (each method's gold interpolated at
common KLs, the numbers of the README's verdict). Plotting needs matplotlib (requirements-dev.txt).

  python sft.py && python gvm.py && python scripts/frontier.py    # the sweep (hours on a 2-core CPU)
  python scripts/frontier.py --plot_only                          # tables and pictures from the runs
  python scripts/frontier.py --methods dvpo,grpo --betas 0.1 --seeds 0 --steps 40   # two runs
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
GVM = "out/gvm"
# method -> (command after `python`, colour, label); {rm} is <out>/rm
METHODS = {
    "dvpo": (["dvpo.py", "--advantage", "td"], "tab:orange", "DVPO: GVM chain, frozen"),
    "ppo": (["ppo_baseline.py", "--reward", "rm:{rm}"], "tab:blue", "PPO: RM, critic (from RM)"),
    "ppo_gvm": (["ppo_baseline.py", "--reward", f"gvm:{GVM}"], "tab:purple", "PPO: GVM w_T, critic (from GVM)"),
    "ppo_gvmcritic": (["ppo_baseline.py", "--reward", "rm:{rm}", "--critic_init", f"gvm:{GVM}"], "tab:cyan",
                      "PPO: RM, critic from GVM"),
    "grpo": (["grpo_baseline.py", "--reward", "rm:{rm}", "--estimator", "grpo"], "tab:green", "GRPO: RM, n = 4"),
    "rloo": (["grpo_baseline.py", "--reward", "rm:{rm}", "--estimator", "rloo"], "tab:olive", "RLOO: RM, n = 4"),
    "grpo_gvm": (["grpo_baseline.py", "--reward", f"gvm:{GVM}", "--estimator", "grpo"], "tab:red",
                 "GRPO: GVM w_T, n = 4"),
    "dr_grpo": (["grpo_baseline.py", "--reward", "rm:{rm}", "--estimator", "dr_grpo"], "tab:brown",
                "Dr. GRPO: RM, n = 4"),
    "remax": (["grpo_baseline.py", "--reward", "rm:{rm}", "--estimator", "remax", "--group_size", "1"], "tab:pink",
              "ReMax: RM, n = 1 + greedy"),
    "dvpo_paper": (["dvpo.py", "--advantage", "paper"], "tab:gray", "DVPO, paper advantages"),
    "dpo": (["dpo_baseline.py"], "black", "DPO (offline; its own β)"),
}
DEFAULT = "dvpo,ppo,ppo_gvm,ppo_gvmcritic,grpo,rloo,grpo_gvm,dpo"
# the scorer whose drift a run logs ({kind}/reward_corr): the GVM's for these, the RM's for the rest
SCORE_KIND = {m: "gvm" if m in ("dvpo", "dvpo_paper", "ppo_gvm", "grpo_gvm") else "rm" for m in METHODS}


def run_dir(out: str, method: str, beta: float, seed: int, steps: int) -> str:
    return os.path.join(out, "runs", f"{method}_b{beta:g}_n{steps}_s{seed}")


def command(out: str, method: str, beta: float, seed: int, steps: int, extra: list) -> list:
    """The run's command line. DPO trains offline on the pairs: its β is DPO's own, and `steps` is unused."""
    args = [a.format(rm=os.path.join(out, "rm")) for a in METHODS[method][0]]
    common = ["--seed", str(seed), "--out_dir", run_dir(out, method, beta, seed, steps)]
    if method == "dpo":
        return [sys.executable] + args + ["--beta", str(beta)] + common + extra
    rl = ["--kl_beta", str(beta), "--steps", str(steps), "--save_every", "0"]
    return [sys.executable] + args + rl + common + extra


def run_one(out: str, method: str, beta: float, seed: int, steps: int, extra: list) -> float:
    """One training run in its own process (one thread); returns its wall time (0 if already done)."""
    d = run_dir(out, method, beta, seed, steps)
    if os.path.exists(os.path.join(d, "summary.json")):
        return 0.0
    os.makedirs(d, exist_ok=True)
    cmd = command(out, method, beta, seed, steps, extra)
    t0 = time.time()
    with open(os.path.join(d, "log.txt"), "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}); see {d}/log.txt")
    return time.time() - t0


def mean_se(xs: list) -> tuple[float, float]:
    xs = [x for x in xs if x == x]  # undefined values (nan) left out
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


def collect(out: str, methods, betas, seeds, steps) -> dict:
    """Every finished run's numbers, and per (method, β, steps) the mean ± stderr over seeds."""
    rows = []
    for m in methods:
        for b in betas:
            for n in ([0] if m == "dpo" else steps):
                for s in seeds:
                    d = run_dir(out, m, b, s, n)
                    if not os.path.exists(os.path.join(d, "summary.json")):
                        continue
                    x = json.load(open(os.path.join(d, "summary.json")))
                    kind = SCORE_KIND[m]
                    row = {"method": m, "beta": b, "steps": n, "seed": s, "gold": x["eval/reward_after"],
                           "gold_stderr": x["eval/reward_stderr"], "gold_greedy": x["eval/reward_greedy_after"],
                           "gold_before": x["eval/reward_before"], "kl": x["eval/kl_to_ref"],
                           "kl_stderr": x["eval/kl_to_ref_stderr"], "seconds": x["train/seconds"],
                           "final_reward_corr": x.get(f"{kind}/reward_corr_final", math.nan),
                           "final_within_prompt_corr": x.get(f"{kind}/reward_corr_within_prompt_final", math.nan)}
                    rows.append(row)
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["beta"], r["steps"]), []).append(r)
    points = []
    for (m, b, n), g in sorted(groups.items()):
        p = {"method": m, "beta": b, "steps": n, "seeds": len(g)}
        for k in ("gold", "gold_greedy", "kl", "seconds", "final_reward_corr", "final_within_prompt_corr"):
            p[k], p[k + "_se"] = mean_se([r[k] for r in g])
        points.append(p)
    acc = {}
    for name, path, key in (("gvm", f"{GVM}/summary.json", "eval/pairwise_accuracy"),
                            ("rm", os.path.join(out, "rm", "summary.json"), "eval/pairwise_accuracy"),
                            ("gold_ceiling", f"{GVM}/summary.json", "eval/gold_pairwise_accuracy")):
        if os.path.exists(os.path.join(ROOT, path)):
            acc[name] = json.load(open(os.path.join(ROOT, path)))[key]
    return {"runs": rows, "points": points, "pairwise_accuracy": acc}


def table(res: dict) -> str:
    out = ["| method | β | steps | KL to ref | gold (sampled) | gold (greedy) | final corr | final corr within "
           "prompt | s/run | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        out.append(f"| {p['method']} | {p['beta']:g} | {p['steps'] or '–'} | {p['kl']:.2f} ± {p['kl_se']:.2f} | "
                   f"{p['gold']:.3f} ± {p['gold_se']:.3f} | {p['gold_greedy']:.3f} ± {p['gold_greedy_se']:.3f} | "
                   f"{p['final_reward_corr']:.2f} | {p['final_within_prompt_corr']:.2f} | {p['seconds']:.0f} | "
                   f"{p['seeds']} |")
    return "\n".join(out)


def interpolate(points: list, kl: float) -> tuple[float, float] | None:
    """A method's (gold, stderr) at this KL, linear in log KL between its two nearest points (points sorted
    by KL); None outside their range."""
    for a, b in zip(points, points[1:]):
        if a["kl"] <= kl <= b["kl"] and a["kl"] > 0:
            f = (math.log(kl) - math.log(a["kl"])) / (math.log(b["kl"]) - math.log(a["kl"])) if b["kl"] > a["kl"] else 0
            return a["gold"] + f * (b["gold"] - a["gold"]), max(a["gold_se"], b["gold_se"])
    return None


def matched_kl(res: dict, steps: int, kls=(1, 1.5, 2, 3)) -> str:
    """Markdown: every method's gold at common KLs (interpolated on its own curve of `steps` steps; DPO's
    points for every length), best point, and the difference to DVPO in units of the larger stderr."""
    curves = {}
    for p in res["points"]:
        if p["steps"] in (steps, 0) and p["kl"] > 0:
            curves.setdefault(p["method"], []).append(p)
    out = [f"| {steps} steps | " + " | ".join(f"gold at KL {k:g}" for k in kls) + " | best point (β: gold, KL) |",
           "|---" * (len(kls) + 2) + "|"]
    ref = {k: interpolate(sorted(curves.get("dvpo", []), key=lambda p: p["kl"]), k) for k in kls}
    for m, ps in curves.items():
        ps = sorted(ps, key=lambda p: p["kl"])
        cells = []
        for k in kls:
            v = interpolate(ps, k)
            if v is None:
                cells.append("–")
                continue
            txt = f"{v[0]:.3f} ± {v[1]:.3f}"
            if m != "dvpo" and ref[k] is not None:
                txt += f" ({(v[0] - ref[k][0]) / max(v[1], ref[k][1], 1e-9):+.1f} se vs DVPO)"
            cells.append(txt)
        best = max(ps, key=lambda p: p["gold"])
        out.append(f"| {m} | " + " | ".join(cells)
                   + f" | {best['beta']:g}: {best['gold']:.3f} ± {best['gold_se']:.3f}, {best['kl']:.2f} |")
    return "\n".join(out)


def plot(res: dict, out: str, drift_beta: float | None):
    import matplotlib  # optional (requirements-dev.txt): only the pictures need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    for ax, key, title in ((axes[0], "gold", "sampled at T = 1"), (axes[1], "gold_greedy", "greedy")):
        for m, (_, color, label) in METHODS.items():
            for n, style in ((40, "--"), (120, "-"), (0, "")):
                ps = sorted((p for p in res["points"] if p["method"] == m and p["steps"] == n), key=lambda p: p["kl"])
                if not ps:
                    continue
                ax.errorbar([p["kl"] for p in ps], [p[key] for p in ps], xerr=[p["kl_se"] for p in ps],
                            yerr=[p[key + "_se"] for p in ps], color=color, ls=style or "none",
                            marker={40: "s", 120: "o", 0: "D"}[n], mfc="white" if n == 40 else color, capsize=2,
                            ms=4, lw=1.2, label=f"{label}" + (f", {n} steps" if n else ""))
        before = [r["gold_before"] for r in res["runs"]] if key == "gold" else []
        if before:
            ax.axhline(statistics.mean(before), color="gray", lw=0.8, ls=":", label="SFT policy (before RL)")
        ax.set_xscale("log")
        ticks = [0.1, 0.2, 0.5, 1, 2, 5, 10]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("KL to the reference, nats per response (held-out)")
        ax.set_ylabel("held-out gold reward")
        ax.set_title(f"gold reward vs KL, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=130)
    if drift_beta is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    n_max = max(p["steps"] for p in res["points"])
    for m, (_, color, label) in METHODS.items():
        curves = []
        for r in res["runs"]:
            if r["method"] == m and r["beta"] == drift_beta and r["steps"] == n_max:
                d = run_dir(out, m, r["beta"], r["seed"], r["steps"])
                curves.append([json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))])
        if not curves:
            continue
        n = min(len(c) for c in curves)
        kind = SCORE_KIND[m]

        def mean(k):
            return [mean_se([c[i].get(k, math.nan) for c in curves])[0] for i in range(n)]

        axes[0].plot(range(1, n + 1), mean(f"{kind}/reward_corr"), color=color, label=label)
        within = mean(f"{kind}/reward_corr_within_prompt")
        if any(x == x for x in within):
            axes[1].plot(range(1, n + 1), within, color=color, label=label)
    axes[0].set_title(f"rank corr(frozen scorer, gold) over each step's rollouts, β = {drift_beta:g}", fontsize=9)
    axes[1].set_title("the same within each prompt's group of 4 samples (group methods), averaged", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "value_drift.png"), dpi=130)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/frontier")
    ap.add_argument("--methods", default=DEFAULT, help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--betas", default="0.01,0.03,0.1,0.3", help="KL β of the RL methods")
    ap.add_argument("--dpo_betas", default="0.03,0.1,0.3,1", help="DPO's own β")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", default="40,120")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--drift_beta", type=float, default=0.1, help="β of the value-drift picture")
    ap.add_argument("--plot_only", action="store_true")
    ap.add_argument("extra", nargs="*", help="extra flags for every run, after --")
    a = ap.parse_args()
    methods, seeds = a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        sys.exit(f"frontier.py: unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    betas, steps = [float(b) for b in a.betas.split(",")], [int(n) for n in a.steps.split(",")]
    dpo_betas = [float(b) for b in a.dpo_betas.split(",")]
    out = os.path.join(ROOT, a.out)
    os.makedirs(out, exist_ok=True)
    if not a.plot_only:
        for need, cmd in (("out/sft", "python sft.py"), (f"{GVM}/gvm_config.json", "python gvm.py")):
            if not os.path.exists(os.path.join(ROOT, need)):
                sys.exit(f"frontier.py: {need} is missing; run `{cmd}` first")
        t0 = time.time()
        if not os.path.exists(os.path.join(out, "rm", "rm_config.json")):  # the RM, once, on the GVM's pairs
            subprocess.run([sys.executable, "reward_model.py", "--out_dir", os.path.join(out, "rm")], cwd=ROOT,
                           check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        todo = [(m, b, s, n) for n in steps for s in seeds for m in methods if m != "dpo" for b in betas]
        todo += [("dpo", b, s, 0) for s in seeds for b in dpo_betas] if "dpo" in methods else []
        print(f"{len(todo)} runs, {a.jobs} at a time -> {out}/runs", flush=True)
        with ThreadPoolExecutor(a.jobs) as pool:
            for i, dt in enumerate(pool.map(lambda x: run_one(out, *x, a.extra), todo)):
                print(f"[{i + 1}/{len(todo)}] {todo[i]} {dt:.0f} s | {time.time() - t0:.0f} s so far", flush=True)
        print(f"sweep wall time {time.time() - t0:.0f} s")
    res = collect(out, methods, sorted(set(betas + dpo_betas)), seeds, steps)
    res["config"] = vars(a)
    with open(os.path.join(out, "frontier.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    print("pairwise accuracy on the same held-out pairs:", res["pairwise_accuracy"])
    text = "\n\n".join(matched_kl(res, n) for n in steps)
    with open(os.path.join(out, "matched_kl.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    plot(res, out, a.drift_beta)
    print(f"-> {out}/frontier.json, frontier.png, value_drift.png, matched_kl.md")


if __name__ == "__main__":
    main()
