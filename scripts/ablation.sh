#!/usr/bin/env bash
# DVPO ablation on the built-in task: advantage estimator (td vs paper) and trajectory
# conditioning (GVM and DVPO with tau_k 0 vs 2), 3 seeds each, same number of steps.
# Needs out/sft and out/gvm (python sft.py && python gvm.py); trains out/gvm_tau2 if missing.
# Prints a markdown table (mean ± std over seeds) and writes $OUT/table.md (default out/ablation).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-0 1 2}"
CONFIGS="${CONFIGS:-td_k0 paper_k0 td_k2 paper_k2}"  # which rows to run
EXTRA="${EXTRA:-}"  # extra dvpo.py flags for every run, e.g. EXTRA="--kl_beta 0.05"
export OUT="${OUT:-out/ablation}"  # where the runs and table.md go
run() {  # name, flags...
  local name=$1; shift
  case " $CONFIGS " in *" $name "*) ;; *) return 0 ;; esac
  if [[ "$name" == *_k2 && ! -f out/gvm_tau2/gvm_config.json ]]; then
    python gvm.py --tau_k 2 --out_dir out/gvm_tau2
  fi
  for s in $SEEDS; do
    [ -f "$OUT/${name}_s$s/summary.json" ] || python dvpo.py --seed "$s" --out_dir "$OUT/${name}_s$s" "$@" $EXTRA
  done
}
run td_k0 --advantage td --gvm out/gvm
run paper_k0 --advantage paper --gvm out/gvm
run td_k2 --advantage td --gvm out/gvm_tau2
run paper_k2 --advantage paper --gvm out/gvm_tau2
python - <<'PY'
import glob, json, os, statistics as st
OUT = os.environ["OUT"]
rows = ["| config | gold before | gold after (sampled) | greedy after | KL to ref | seconds/run | seeds |",
        "|---|---|---|---|---|---|---|"]
f = lambda xs: f"{st.mean(xs):.3f} ± {st.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
for name in ("td_k0", "paper_k0", "td_k2", "paper_k2"):
    s = [json.load(open(p)) for p in sorted(glob.glob(f"{OUT}/{name}_s*/summary.json"))]
    if s:
        rows.append(f"| {name} | {f([x['eval/reward_before'] for x in s])} | {f([x['eval/reward_after'] for x in s])} "
                    f"| {f([x['eval/reward_greedy_after'] for x in s])} | {f([x['eval/kl_to_ref'] for x in s])} "
                    f"| {st.mean(x['train/seconds'] for x in s):.0f} | {len(s)} |")
open(f"{OUT}/table.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
