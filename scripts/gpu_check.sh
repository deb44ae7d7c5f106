#!/usr/bin/env bash
# scripts/gpu_check.sh — a one-shot proof of the CUDA path (issue 18), about 8 minutes on one H100/H200,
# no internet. Every step runs even if an earlier one failed; each is timed; out/gpu_check/summary.md
# holds one table (and every step's log lies beside it).
#   1. pipeline    the built-in pipeline in one process, short (sft -> gvm -> reward_model -> dvpo -> ppo):
#                  `python x.py` on one GPU is a 1-rank NCCL group, FSDP2, bf16 compute, fp32 master weights
#   2. resume      dvpo.py under `torchrun --nproc_per_node 1`, killed after its step-2 checkpoint
#                  (DVPO_KILL_AT) and resumed with --resume auto, against an uninterrupted run: max |Δ| of
#                  the final weights (0 = bit-identical)
#   3. sdpa        left-padded SDPA forward/backward: non-finite gradients with cuDNN SDPA forced on and
#                  with this repo's setting, and a policy backward on a left-padded batch (scripts/gpu_probes.py)
#   4. bench       bench.py --preset 1b: DVPO, PPO and GRPO peak memory and step time (dry run: DVPO, PPO)
#   5. generation  decoding tokens/s of the 1b preset: as dvpo.py runs it, without the per-token host sync,
#                  and without FSDP2's hooks (scripts/gpu_probes.py)
#
#   bash scripts/gpu_check.sh                      # on the GPU machine, from the repo root
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh      # the same steps on the CPU at toy sizes (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-out/gpu_check}
rm -rf "$OUT" && mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then  # toy sizes on the CPU: the script's logic, not the GPU's numbers
    export OMP_NUM_THREADS=1
    DEV=cpu; SFT="--steps 4 --n_train 64 --eval_prompts 8"; PAIRS="--builtin_prompts 32 --builtin_eval_prompts 8"
    PAIRS="$PAIRS --rtg_prompts 4 --rtg_completions 2 --epochs 1"; RM="--epochs 1 --rtg_prompts 4 --rtg_completions 2"
    RL="--steps 2 --batch_size 8 --minibatch_size 4 --micro_batch_size 2 --eval_prompts 8"
    BENCH="--preset tiny --repeats 1 --warmup 1 --steps 1 --batch_size 4 --minibatch_size 2 --micro_batch_size 1"
    BENCH="$BENCH --prompt_len 6 --response_len 5 --ppo_epochs 1 --threads 1 --methods dvpo,ppo"
    GEN="--preset tiny --batch 4 --new_tokens 8"; SDPA="--lengths 128,256"
else
    DEV=cuda; SFT="--steps 300 --n_train 8000 --eval_prompts 256"; PAIRS="--builtin_prompts 2000 --builtin_eval_prompts 200"
    PAIRS="$PAIRS --rtg_prompts 64 --epochs 1"; RM="--epochs 1 --rtg_prompts 64"
    RL="--steps 6 --batch_size 64 --minibatch_size 32 --micro_batch_size 16 --eval_prompts 256"
    BENCH="--preset 1b --repeats 1 --warmup 1 --steps 2 --batch_size 8 --minibatch_size 8 --micro_batch_size 4"
    BENCH="$BENCH --prompt_len 128 --response_len 256"; GEN="--preset 1b --batch 32 --prompt_len 64 --new_tokens 256"
    SDPA=""  # every length of scripts/gpu_probes.py
fi
P="$OUT/p"  # the pipeline's folders
declare -A STATUS SECONDS_OF

step() {  # step NAME COMMAND...: run it, log to $OUT/NAME.log, record pass/fail and wall seconds
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    if "$@" > "$OUT/$name.log" 2>&1; then STATUS[$name]=pass; else STATUS[$name]="FAIL (exit $?)"; fi
    SECONDS_OF[$name]=$((SECONDS - t0))
    echo "   ${STATUS[$name]} in ${SECONDS_OF[$name]} s"
}

pipeline() {
    python sft.py --device $DEV --out_dir $P/sft $SFT \
    && python gvm.py --device $DEV --model $P/sft --out_dir $P/gvm $PAIRS \
    && python reward_model.py --device $DEV --model $P/sft --data $P/gvm/pairs_train.jsonl \
        --eval_data $P/gvm/pairs_eval.jsonl --out_dir $P/rm $RM \
    && python dvpo.py --device $DEV --model $P/sft --gvm $P/gvm --out_dir $P/dvpo $RL \
    && python ppo_baseline.py --device $DEV --model $P/sft --reward rm:$P/rm --out_dir $P/ppo $RL
}

resume() {  # an uninterrupted 4-step run, and one killed after its step-2 checkpoint, then resumed
    local args="--device $DEV --model $P/sft --gvm $P/gvm $RL --steps 4 --save_every 2"
    local run="python -m torch.distributed.run --standalone --nproc_per_node 1 dvpo.py"
    $run $args --out_dir $OUT/resume_ref || return 1
    DVPO_KILL_AT=manifest:1 $run $args --out_dir $OUT/resume_killed  # killed (SIGKILL) after the step-2 save
    $run $args --out_dir $OUT/resume_killed --resume auto || return 1
    python - "$OUT" <<'EOF'
import json, sys
from safetensors.torch import load_file
out = sys.argv[1]
a, b = load_file(f"{out}/resume_ref/model.safetensors"), load_file(f"{out}/resume_killed/model.safetensors")
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
json.dump({"max_abs_diff": diff}, open(f"{out}/resume.json", "w"))
print(f"resumed vs uninterrupted: max |Δ| of the final weights = {diff:.3g}")
EOF
}

step pipeline pipeline
step resume resume
step sdpa sh -c "python scripts/gpu_probes.py sdpa --device $DEV $SDPA > $OUT/sdpa.json"
step bench python bench.py $BENCH --out_dir $OUT/bench
step generation sh -c "python scripts/gpu_probes.py generation --device $DEV $GEN > $OUT/generation.json"

for name in pipeline resume sdpa bench generation; do echo "$name ${STATUS[$name]} ${SECONDS_OF[$name]}"; done \
    > "$OUT/steps.txt"
python - "$OUT" "$P" <<'EOF'
import json, os, sys
out, p = sys.argv[1], sys.argv[2]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
rows = ["| step | status | wall s | result |", "|---|---|---|---|"]
for line in open(f"{out}/steps.txt"):
    name, *status, secs = line.split()
    res = ""
    if name == "pipeline":
        d, g, q = (load(f"{p}/{k}/summary.json") or {} for k in ("dvpo", "gvm", "ppo"))
        res = (f"GVM pairwise acc {g.get('eval/pairwise_accuracy', float('nan')):.3f}; DVPO gold "
               f"{d.get('eval/reward_before', float('nan')):.3f} -> {d.get('eval/reward_after', float('nan')):.3f}, "
               f"KL {d.get('eval/kl_to_ref', float('nan')):.3f}; PPO gold -> {q.get('eval/reward_after', float('nan')):.3f}")
        rows0 = [json.loads(line) for line in open(f"{p}/dvpo/metrics.jsonl")] if os.path.exists(f"{p}/dvpo/metrics.jsonl") else []
        if rows0:
            res += f"; step-1 KL {rows0[0].get('kl', float('nan')):.2g}, clipfrac {rows0[0].get('clipfrac', float('nan')):.2g}"
    elif name == "resume":
        r = load(f"{out}/resume.json")
        res = f"max |Δ| final weights {r['max_abs_diff']:.3g}" if r else ""
    elif name == "sdpa":
        r = load(f"{out}/sdpa.json")
        if r:
            res = "; ".join(f"L={c['L']}: repo {c['repo_setting_nonfinite']}" +
                            (f", cuDNN forced {c['cudnn_forced_nonfinite']}" if "cudnn_forced_nonfinite" in c else "")
                            for c in r["cases"]) + f"; policy grad non-finite {r['policy_grad_nonfinite']}"
    elif name == "bench":
        r = load(f"{out}/bench/bench.json")
        if r:
            res = (f"peak GiB DVPO {r['dvpo']['peak_memory_bytes'] / 2**30:.2f} / PPO {r['ppo']['peak_memory_bytes'] / 2**30:.2f} "
                   f"(ratio {r['ratio/memory']:.3f}); step s DVPO {r['dvpo']['step_time_s']:.2f} / PPO "
                   f"{r['ppo']['step_time_s']:.2f} (ratio {r['ratio/step_time']:.3f})")
            if "grpo" in r:
                res += (f"; GRPO {r['grpo']['peak_memory_bytes'] / 2**30:.2f} GiB, {r['grpo']['step_time_s']:.2f} s "
                        f"(GRPO/PPO {r['ratio/grpo_memory']:.3f}, {r['ratio/grpo_step_time']:.3f})")
    elif name == "generation":
        r = load(f"{out}/generation.json")
        if r:
            res = ", ".join(f"{k} {r[k]:.0f} tok/s" for k in ("fsdp2_sync_per_token", "fsdp2_no_sync",
                                                             "plain_sync_per_token", "plain_no_sync"))
    rows.append(f"| {name} | {' '.join(status)} | {secs} | {res} |")
text = "\n".join(rows)
open(f"{out}/summary.md", "w").write(text + "\n")
print(text)
EOF
grep -q FAIL "$OUT/steps.txt" && exit 1
exit 0
