"""scripts/projection.py — the analytic per-rank memory of one DVPO / PPO step under FSDP2, phase by phase
(per_rank_memory: sharded state; generation with the gathered policy and its KV cache, for the rollout batch and
the held-out evaluation's --eval_batch_size; the frozen forwards one micro-batch at a time; the update's
activations with and without checkpointing, its logits, gathered blocks and, under --grad_sync last, unsharded
gradients; the loading transient; docs/performance.md). The byte counts of one term each (bytes per
parameter, logits, KV cache) are bench.py's pure functions.
  1. The projection: Llama 3.2 1B / 3B and Llama 3.1 8B / 70B on 8 × 80 GB at the paper's batch and
     lengths, without and with activation checkpointing, beside the paper's Table 3 (no run, seconds).
  2. Scenarios: the README's real-model example (Qwen2.5-0.5B on one GPU) and the same flags at 8B on 8 GPUs.
  3. --bench: the same model for a bench.py run (its bench.json), beside its measured per-rank figures.

  python scripts/projection.py                                   # the projection and scenario tables (markdown)
  python bench.py --preset 50m --processes 2 && python scripts/projection.py --bench out/bench/bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from transformers import AutoConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402  (the repo root, not installed)

# per_rank_memory's shapes of Llama 3.2 1B / 3B and Llama 3.1 8B / 70B (their config.json files)
LLAMA = {"1B": dict(hidden=2048, inter=8192, layers=16, kv=512, vocab=128256, tied=True),
         "3B": dict(hidden=3072, inter=8192, layers=28, kv=1024, vocab=128256, tied=True),
         "8B": dict(hidden=4096, inter=14336, layers=32, kv=1024, vocab=128256, tied=False),
         "70B": dict(hidden=8192, inter=28672, layers=80, kv=1024, vocab=128256, tied=False)}
QWEN_05B = dict(hidden=896, inter=4864, layers=24, kv=128, vocab=151936, tied=True)  # Qwen2.5-0.5B (+ qkv biases)
# the paper's App. A PPO/DVPO setting per GPU: rollout batch 8, mini-batch 2 with 2 accumulation steps
# (micro-batch 1 or 2: we take 2), 1024 generated tokens; its prompt length is not given: 512 assumed;
# the held-out evaluation at --eval_batch_size 64
PAPER_RUN = dict(world=8, micro=2, rollout=8, seq_len=512 + 1024, response_len=1024, micro_steps=2, eval_batch=64)
# the README's "Your own model and data" example: --max_new_tokens 512 --batch_size 64 --minibatch_size 16
# --micro_batch_size 2 --gradient_checkpointing, prompts up to --max_prompt_len 512, --eval_batch_size 64
README_RUN = dict(micro=2, seq_len=512 + 512, response_len=512, checkpointing=True, eval_batch=64)
SCENARIOS = {"README example: Qwen2.5-0.5B, 1 GPU": (QWEN_05B, dict(README_RUN, world=1, rollout=64, micro_steps=8)),
             "same flags: Llama 3.1 8B, 8 GPUs": (LLAMA["8B"], dict(README_RUN, world=8, rollout=8, micro_steps=1)),
             "same, --grad_sync last: 8B, 8 GPUs, micro-batch 1": (LLAMA["8B"], dict(
                 README_RUN, world=8, rollout=8, micro=1, micro_steps=2, grad_sync="last"))}


def shape_of(config) -> dict:
    """per_rank_memory's shape of an HF Llama-style config."""
    return dict(hidden=config.hidden_size, inter=config.intermediate_size, layers=config.num_hidden_layers,
                kv=config.num_key_value_heads * config.hidden_size // config.num_attention_heads,
                vocab=config.vocab_size, tied=bool(config.tie_word_embeddings))


def llama_params(s: dict) -> tuple[int, int, int]:
    """(N_π, N_v, parameters of one block): a block has 2H² + 2·H·kv (attention) + 3·H·I (MLP) + 2H
    (norms); the embeddings V·H, the LM head another V·H unless tied; the value model drops the LM
    head and adds its H + 1 head."""
    H, V = s["hidden"], s["vocab"]
    block = 2 * H * H + 2 * H * s["kv"] + 3 * H * s["inter"] + 2 * H
    backbone = s["layers"] * block + V * H + H
    return backbone + (0 if s["tied"] else V * H), backbone + H + 1, block


def block_values(s: dict, seq_len: int) -> int:
    """Values one decoder block keeps per token for its backward (HF Llama, SDPA; parameters excluded):
    11H + 4I + L. Two RMSNorms' inputs and normalized outputs (4H), the rotated q and the keys and values
    repeated to every head (3H: transformers' SDPA path repeats them whenever there is an attention mask,
    which the padded layouts always have), the attention output and o_proj's input (2H), the two residual
    adds' inputs (2H), gate, up, silu(gate) and their product (4I), and the (B, 1, L, L) attention mask
    in the compute dtype that each block's SDPA saves (L per token). Counted with saved_tensors_hooks:
    9H + 2·kv + 4I without a mask, + 2(H - kv) + L with one."""
    return 11 * s["hidden"] + 4 * s["inter"] + seq_len


def activation_bytes(s: dict, seqs: int, seq_len: int, response_len: int, checkpointing: bool, a: int,
                     lm_head: bool = True) -> float:
    """Bytes alive for the backward of one training forward on `seqs` sequences of seq_len tokens, a bytes
    per activation: the blocks (block_values per token and block; with checkpointing only each block's
    input, H, plus one block being recomputed) and the head: a policy's logits (bench.logits_bytes with
    grad), or a value model's last hidden state and its fp32 copy for the fp32 value head."""
    per_block = block_values(s, seq_len)
    kept = s["layers"] * s["hidden"] + per_block if checkpointing else s["layers"] * per_block
    head = (bench.logits_bytes(seqs, response_len, s["vocab"], a, grad=True) if lm_head
            else seqs * seq_len * s["hidden"] * (a + 4 * (a < 4)))
    return seqs * seq_len * kept * a + head


def per_rank_memory(method: str, s: dict, world: int, micro: int, rollout: int, seq_len: int, response_len: int,
                    checkpointing: bool = False, cuda: bool = True, micro_steps: int = 1, eval_batch: int = 0,
                    grad_sync: str = "every") -> dict:
    """Analytic bytes per rank of one step under FSDP2 over `world` ranks (a 1-rank group on CUDA too, as
    fsdp_utils.setup makes one). cuda: bf16 compute, activations and frozen models (p = a = f = 2), fp32
    master weights; CPU: all fp32 (4), and FSDP2 only with world > 1. G = 4·N_trained/world, the sharded
    gradients, which update() frees when it ends and zero_grad(set_to_none) before each minibatch.
      state    = model_memory with T = 16/world, F = f/world   (sharded weights, gradients, AdamW)
      generate = KV cache (bench.kv_cache_bytes) of the rows sampled at once + the larger of the prefill's
                 transient (rows·P·(2H + 3I)·a) and a decode step's logits and softmax (rows·V·(a + 8))
                 + p·N_π (FSDP2: the policy gathered for the whole generation, fu.gathered)
      rollout  = state - G + generate(rollout rows)
      score    = state - G + one frozen forward on a micro-batch, no grad: its largest block transient
                 (micro·L·(2H + 3I)·a) + bench.logits_bytes(no grad) + p·(2 blocks + embeddings/head) gathered
      eval     = state - G + max(generate(eval_batch rows), the score phase's forward)   (eval_batch > 0)
      update   = state + p·(2 blocks + embeddings/head) gathered (FSDP2), and activation_bytes:
                 one micro-batch per optimizer step: max(acts_π - G, PPO: acts_critic - 4·N_v/world): no
                 gradient exists before the policy's backward, the policy's before the critic's;
                 several: max(acts_π, acts_critic) on top of the first micro-batch's gradients, which under
                 --grad_sync last (FSDP2) are the unsharded fp32 ones: + 4·N_trained - G
      optimizer = state + AdamW's temporaries: on CUDA its foreach implementation makes one of every parameter
                 of the model it steps (4·N/world; PPO steps one model at a time), on CPU its per-tensor loop two
                 of the largest tensor (2·4·max(V·H, H·I)/world)
      peak     = max(rollout, score, eval, update, optimizer)
      load     = weights/world (trained 4 B, frozen f) + on rank 0 the largest model in full (world > 1),
                 on the others the largest single tensor (one broadcast at a time).
    Not modelled: the backward's per-block gradient buffers, allocator slack
    and CUDA workspaces, and the runtime itself (~0.35 GiB of Python, torch and transformers on CPU)."""
    p = a = f = 2 if cuda else 4
    n_pi, n_v, block = llama_params(s)
    H, I, V, P = s["hidden"], s["inter"], s["vocab"], seq_len - response_len
    trained = n_pi + n_v if method == "ppo" else n_pi
    fsdp = world > 1 or cuda
    state = bench.model_memory(method, n_pi, n_v, 16 / world, f / world)
    G = 4 * trained / world
    gathered = fsdp * p * (2 * block + V * H * (1 if s["tied"] else 2) + H)

    def generate(rows):
        kv = (bench.kv_cache_bytes(rows, P, s["layers"], s["kv"], a) + rows * P * (2 * H + 3 * I) * a,
              bench.kv_cache_bytes(rows, seq_len, s["layers"], s["kv"], a) + rows * V * (a + 8))
        return fsdp * p * n_pi + max(kv)

    forward = gathered + micro * seq_len * (2 * H + 3 * I) * a + bench.logits_bytes(micro, response_len, V, a, False)
    acts = activation_bytes(s, micro, seq_len, response_len, checkpointing, a)
    acts_v = activation_bytes(s, micro, seq_len, response_len, checkpointing, a, lm_head=False)
    if micro_steps == 1:
        extra = max(acts - G, acts_v - 4 * n_v / world if method == "ppo" else 0, 0)
    else:
        unsharded = fsdp * (grad_sync == "last") * (4 * trained - G)
        extra = unsharded + max(acts, acts_v if method == "ppo" else 0)
    out = {"state": state, "rollout": state - G + generate(rollout), "score": state - G + forward,
           "eval": state - G + max(generate(eval_batch), forward) if eval_batch else 0,
           "update": state + gathered + extra}
    largest = max(V * H, H * I) * 4
    out["optimizer"] = state + (4 * max(n_pi, n_v if method == "ppo" else 0) if cuda else 2 * largest) / world
    out["peak"] = max(out["rollout"], out["score"], out["eval"], out["update"], out["optimizer"])
    weights = (4 * trained + f * (n_pi + n_v)) / world
    out.update(load_rank0=weights + (world > 1) * 4 * max(n_pi, n_v), load_other=weights + (world > 1) * largest)
    return out


def projection_table() -> str:
    """Markdown: per_rank_memory (GiB per GPU) of the LLAMA shapes at PAPER_RUN beside the paper's Table 3:
    each phase, the update without and with activation checkpointing (AC) and with AC under --grad_sync last
    (gradients accumulated unsharded over the micro-batches); peak = max over the phases."""
    GB = 2**30
    out = ["| model | method | state | rollout | score | eval (64 prompts) | update | update, AC | update, AC, "
           "--grad_sync last | peak, AC | peak, AC, --grad_sync last | paper Table 3 |", "|---" * 12 + "|"]
    for name, s in LLAMA.items():
        for m in ("dvpo", "ppo"):
            r, ac, last = (per_rank_memory(m, s, checkpointing=c, grad_sync=g, **PAPER_RUN)
                           for c, g in ((False, "every"), (True, "every"), (True, "last")))
            cells = (r["state"], r["rollout"], r["score"], r["eval"], r["update"], ac["update"], last["update"],
                     ac["peak"], last["peak"])
            paper = bench.PAPER.get(name, {}).get(m)
            out.append(f"| {name} ({llama_params(s)[0] / 1e9:.2f}B) | {m.upper()} | "
                       + " | ".join(f"{x / GB:.1f}" for x in cells) + f" | {f'{paper[0]} GB' if paper else ''} |")
    return "\n".join(out)


def scenario_table() -> str:
    """Markdown: per_rank_memory (GiB per GPU) of SCENARIOS, phase by phase (DVPO and PPO)."""
    GB = 2**30
    out = ["| setting | method | state | rollout | score | eval | update | peak |", "|---" * 8 + "|"]
    for name, (s, kw) in SCENARIOS.items():
        for m in ("dvpo", "ppo"):
            r = per_rank_memory(m, s, **kw)
            out.append(f"| {name} | {m.upper()} | " + " | ".join(
                f"{r[k] / GB:.1f}" for k in ("state", "rollout", "score", "eval", "update", "peak")) + " |")
    return "\n".join(out)


def rank_table(res: dict) -> str:
    """Markdown, one row per rank: loading and step peaks (net, GiB) beside the rank's shards plus the
    largest single tensor: bench.py's per-rank figures."""
    GB = 2**30
    out = ["| rank | DVPO load peak | its shards + largest tensor | DVPO step peak | PPO load peak | "
           "its shards + largest tensor | PPO step peak |", "|---|---|---|---|---|---|---|"]
    for r, ranks in enumerate(zip(res["dvpo"]["per_rank"], res["ppo"]["per_rank"])):
        cells = [f"{x['load_peak'] / GB:.3f} | {(x['shards'] + x['largest_tensor']) / GB:.3f} | "
                 f"{x['step_peak'] / GB:.3f}" for x in ranks]
        out.append(f"| {r} | {' | '.join(cells)} |")
    return "\n".join(out)


def bench_table(res: dict) -> str:
    """Markdown: a bench.json's measured per-rank figures (rank_table) and, as a last row,
    per_rank_memory at the same shape, batch, lengths, ranks and device."""
    cfg, nproc, GB = res["config"], res["nproc"], 2**30
    path = cfg["model"] or os.path.join(cfg["out_dir"], f"model_{cfg['preset']}")
    mb_rank, shape = cfg["minibatch_size"] // nproc, shape_of(AutoConfig.from_pretrained(path))
    micro = min(cfg["micro_batch_size"], mb_rank)
    seq_len, cuda = cfg["prompt_len"] + cfg["response_len"], res["device"].startswith("cuda")
    an = {m: per_rank_memory(m, shape, nproc, micro, cfg["batch_size"] // nproc, seq_len, cfg["response_len"],
                             cfg["gradient_checkpointing"], cuda, mb_rank // micro) for m in ("dvpo", "ppo")}
    phases = "; ".join(f"{m.upper()} " + ", ".join(f"{k} {an[m][k] / GB:.3f}" for k in ("state", "rollout", "score",
                                                                                      "update", "optimizer"))
                       for m in an)
    return rank_table(res) + "\n| analytic | " + " | ".join(
        f"{an[m]['load_rank0'] / GB:.3f} (rank 0), {an[m]['load_other'] / GB:.3f} | | {an[m]['peak'] / GB:.3f}"
        for m in ("dvpo", "ppo")) + f" |\n\nanalytic phases (GiB): {phases}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="", help="a bench.json: its per-rank figures beside per_rank_memory")
    args = ap.parse_args()
    if args.bench:
        with open(args.bench) as f:
            print("per rank, net GiB (loading: peak vs. the rank's shards + its largest tensor):\n"
                  + bench_table(json.load(f)))
    else:
        print(projection_table() + "\n\n" + scenario_table())
