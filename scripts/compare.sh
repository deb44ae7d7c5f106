#!/usr/bin/env bash
# PPO baseline vs DVPO on the built-in task: same SFT policy, same preference pairs (the GVM's),
# same rollout/loss/hyperparameters/steps, 3 seeds each. Needs out/sft and out/gvm
# (python sft.py && python gvm.py). Trains the reward model once ($OUT/rm), then PPO and
# DVPO per seed; prints a markdown table and writes $OUT/table.md (default out/compare).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-0 1 2}"
EXTRA="${EXTRA:-}"  # extra flags for both dvpo.py and ppo_baseline.py, e.g. EXTRA="--kl_beta 0.05"
export OUT="${OUT:-out/compare}"  # where the runs and table.md go
mkdir -p "$OUT"
[ -f "$OUT/rm/rm_config.json" ] || python ppo_baseline.py --stage rm --out_dir "$OUT"
for s in $SEEDS; do
  [ -f "$OUT/ppo_s$s/summary.json" ] || python ppo_baseline.py --stage ppo --rm "$OUT/rm" --seed "$s" --out_dir "$OUT/ppo_s$s" $EXTRA
  [ -f "$OUT/dvpo_s$s/summary.json" ] || python dvpo.py --seed "$s" --out_dir "$OUT/dvpo_s$s" $EXTRA
done
python - <<'PY'
import glob, json, os, statistics as st
OUT = os.environ["OUT"]
f = lambda xs: f"{st.mean(xs):.3f} ± {st.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
def step_s(d):  # median wall time per training step from metrics.jsonl
    return st.median(json.loads(l)["time/step_s"] for l in open(os.path.join(d, "metrics.jsonl")))
rm = json.load(open(f"{OUT}/rm/rm_config.json"))
gv = json.load(open("out/gvm/summary.json"))
rows = [f"Reward model held-out pairwise accuracy {rm['rm/pairwise_accuracy']:.3f}; GVM {gv['eval/pairwise_accuracy']:.3f}; "
        f"gold-label ceiling {gv['eval/gold_pairwise_accuracy']:.3f} (same {gv['eval/pairs']} held-out pairs).", "",
        "| method | held-out gold reward (sampled, T=1) | greedy | KL to ref | s/step (median) | seeds |", "|---|---|---|---|---|---|"]
runs = {m: [d for d in sorted(glob.glob(f"{OUT}/{m}_s*")) if os.path.exists(d + "/summary.json")] for m in ("ppo", "dvpo")}
s0 = [json.load(open(d + "/summary.json")) for d in runs["dvpo"] + runs["ppo"]]
rows.append(f"| SFT (before RL) | {f([x['eval/reward_before'] for x in s0])} | {f([x['eval/reward_greedy_before'] for x in s0])} | 0 | – | {len(s0)} evals |")
for m, name in (("ppo", "PPO (RM + critic)"), ("dvpo", "DVPO (frozen GVM)")):
    s = [json.load(open(d + "/summary.json")) for d in runs[m]]
    if s:
        rows.append(f"| {name} | {f([x['eval/reward_after'] for x in s])} | {f([x['eval/reward_greedy_after'] for x in s])} "
                    f"| {f([x['eval/kl_to_ref'] for x in s])} | {st.mean(step_s(d) for d in runs[m]):.2f} | {len(s)} |")
rows.append(f"\nsteps per run: {s0[0]['train/steps']}; loadavg at the end: {os.getloadavg()[0]:.1f}")
open(f"{OUT}/table.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
