"""scripts/projection.py — the analytic per-rank memory of one DVPO / PPO step under FSDP2
(per_rank_memory: sharded state, the policy gathered for generation with its KV cache, gathered blocks,
unsharded no-sync gradients and activations in the update, the loading transient; docs/performance.md).
  1. The projection: Llama 3.2 1B / 3B and Llama 3.1 8B / 70B on 8 × 80 GB at the paper's batch and
     lengths, without and with activation checkpointing, beside the paper's Table 3 (no run, seconds).
  2. --bench: the same model for a bench.py run (its bench.json), beside its measured per-rank figures.

  python scripts/projection.py                                   # the projection table (markdown)
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
# the paper's App. A PPO/DVPO setting per GPU: rollout batch 8, mini-batch 2 with 2 accumulation steps
# (micro-batch 1 or 2: we take 2), 1024 generated tokens; its prompt length is not given: 512 assumed
PAPER_RUN = dict(world=8, micro=2, rollout=8, seq_len=512 + 1024, response_len=1024)


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


def activation_bytes(s: dict, seqs: int, seq_len: int, response_len: int, checkpointing: bool, a: int) -> float:
    """Bytes alive for the backward of one policy forward on `seqs` sequences of seq_len tokens (a
    bytes per activation; attention by SDPA, which keeps no L×L matrix). Per token and block, HF
    Llama saves ≈ 9H + 2·kv + 4I values (two RMSNorms 3H each, rotated q and k, v, the attention
    output and o_proj's input, gate, up, silu(gate), their product); with checkpointing only each
    block's input H, plus one block being recomputed. Logits: the (L, V) logits (a bytes, and their
    fp32 copy unless a = 4) and three fp32 (T, V) tensors (response logits, log-softmax, its exp)."""
    per_block = 9 * s["hidden"] + 2 * s["kv"] + 4 * s["inter"]
    kept = s["layers"] * s["hidden"] + per_block if checkpointing else s["layers"] * per_block
    logits = seq_len * (a + 4 * (a < 4)) + 3 * 4 * response_len
    return seqs * (seq_len * kept * a + s["vocab"] * logits)


def per_rank_memory(method: str, s: dict, world: int, micro: int, rollout: int, seq_len: int, response_len: int,
                    checkpointing: bool = False, cuda: bool = True, micro_steps: int = 1) -> dict:
    """Analytic bytes per rank of one step under FSDP2 over `world` ranks. cuda: bf16 compute,
    activations and frozen models (p = a = f = 2), fp32 master weights; CPU: all fp32 (4).
      state   = model_memory with T = 16/world, F = f/world      (sharded weights, grads, AdamW)
      rollout = state - 4·N_trained/world (update() frees the gradients when it ends)
                      + p·N_π (the policy gathered for generation, world > 1)
                      + KV cache rollout·seq_len·layers·2·kv·a
      update  = state + p·(2 blocks + embeddings/head) (gathered, world > 1)
                      + 4·N_trained (unsharded fp32 gradients while gradient sync is off between
                        micro-batches: micro_steps > 1, world > 1)
                      + max(0, activation_bytes(micro) - 4·N_last/world): zero_grad(set_to_none)
                        frees the gradients before each minibatch, so the activations of the last
                        model trained (policy; PPO: critic, policy gradients alive) take their place
      peak    = max(rollout, update)
      load    = weights/world (trained 4 B, frozen f) + on rank 0 the largest model in full (world > 1),
                on the others the largest single tensor (one broadcast at a time)."""
    p = a = f = 2 if cuda else 4
    n_pi, n_v, block = llama_params(s)
    trained, last = (n_pi + n_v, n_v) if method == "ppo" else (n_pi, n_pi)
    shared = world > 1
    state = bench.model_memory(method, n_pi, n_v, 16 / world, f / world)
    kv = rollout * seq_len * s["layers"] * 2 * s["kv"] * a
    root = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2) + s["hidden"]
    acts = activation_bytes(s, micro, seq_len, response_len, checkpointing, a)
    update = shared * (p * (2 * block + root) + (micro_steps > 1) * 4 * trained) + max(0, acts - 4 * last / world)
    weights = (4 * trained + f * (n_pi + n_v)) / world
    largest = max(s["vocab"] * s["hidden"], s["hidden"] * s["inter"]) * 4
    rollout = shared * p * n_pi + kv - 4 * trained / world
    return {"state": state, "rollout": state + rollout, "update": state + update, "peak": state + max(rollout, update),
            "load_rank0": weights + shared * 4 * max(n_pi, n_v), "load_other": weights + shared * largest}


def projection_table() -> str:
    """Markdown: per_rank_memory (GiB per GPU) of the LLAMA shapes at PAPER_RUN beside the paper's
    Table 3: the update without and with activation checkpointing (AC), and with AC but gradients
    reduce-scattered after every micro-batch (no unsharded gradient copy); peak = max(rollout, update)."""
    GB, out = 2**30, ["| model | method | state | rollout | update | update, AC | update, AC, sync every micro-batch "
                      "| peak, AC | peak, AC, sync every micro-batch | paper Table 3 |", "|---" * 10 + "|"]
    for name, s in LLAMA.items():
        for m in ("dvpo", "ppo"):
            r, ac, sync = (per_rank_memory(m, s, checkpointing=c, **dict(PAPER_RUN, micro_steps=k))
                           for c, k in ((False, 2), (True, 2), (True, 1)))
            cells = (r["state"], r["rollout"], r["update"], ac["update"], sync["update"], ac["peak"], sync["peak"])
            paper = bench.PAPER.get(name, {}).get(m)
            out.append(f"| {name} ({llama_params(s)[0] / 1e9:.2f}B) | {m.upper()} | "
                       + " | ".join(f"{x / GB:.1f}" for x in cells) + f" | {f'{paper[0]} GB' if paper else ''} |")
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
    return rank_table(res) + "\n| analytic | " + " | ".join(
        f"{an[m]['load_rank0'] / GB:.3f} (rank 0), {an[m]['load_other'] / GB:.3f} | | {an[m]['peak'] / GB:.3f}"
        for m in ("dvpo", "ppo")) + " |"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="", help="a bench.json: its per-rank figures beside per_rank_memory")
    args = ap.parse_args()
    if args.bench:
        with open(args.bench) as f:
            print("per rank, net GiB (loading: peak vs. the rank's shards + its largest tensor):\n"
                  + bench_table(json.load(f)))
    else:
        print(projection_table())
