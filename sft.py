"""sft.py — supervised fine-tuning: the starting policy of the pipeline SFT -> GVM -> DVPO.

  1. Data: (prompt x, response y) pairs; z = x ⊕ y with y ending in EOS.
  2. Loss: next-token NLL on response tokens only,  L = -(1/N) Σ_b Σ_t log π(y_t | x, y_<t),
     N = number of response tokens in the global batch (all ranks), so the loss is a token mean
     that does not depend on how the batch is split over processes.
  3. AdamW, linear warmup then cosine decay, grad-norm clipping.
  4. On the built-in task: held-out gold reward of samples at temperature 1 (and greedy).

Launch:
  python sft.py                                                  # built-in task -> out/sft (~1-2 min CPU)
  python sft.py --model Qwen/Qwen2.5-0.5B --data sft.jsonl --out_dir out/sft_qwen
  torchrun --nproc_per_node 8 sft.py --model <path> --data sft.jsonl
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checkpoint
import data
import fsdp_utils as fu
import task
import train_utils as tu


@dataclass
class Config:
    model: str = ""  # hub id or local path; empty = the built-in tiny Llama
    data: str = ""  # SFT JSONL/JSON file ({prompt, response} or {messages}); empty = built-in demos
    out_dir: str = "out/sft"
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # sequences per step, global (split over ranks)
    lr: float = 3e-3  # peak learning rate (use ~1e-5 for real models)
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_prompt_len: int = 512  # prompts longer than this are cut from the left
    max_response_len: int = 512  # responses longer than this are cut from the right
    n_train: int = 20000  # built-in task: number of demonstrations
    eval_prompts: int = 1024  # built-in task: held-out prompts for the reward evaluation
    eval_size: int = 64  # real data: examples held out (at most 10% of them), for eval NLL and --eval_reward
    eval_reward: str = ""  # module:function f(prompt, response) -> float; empty = built-in gold reward
    max_new_tokens: int = 16  # evaluation: tokens per sampled response
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    log_every: int = 50
    seed: int = 0
    device: str = "auto"


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, n_tokens: float) -> torch.Tensor:
    """Sum of response-token NLL divided by the global token count n_tokens.
    logp, mask: (B, T). Under FSDP gradients are averaged over ranks, so each rank scales its
    sum by world / n_tokens to make the result a global token mean."""
    return -(logp * mask).sum() * fu.world() / n_tokens


def main(cfg: Config):
    device = fu.setup(cfg.device)
    tu.seed_everything(cfg.seed)  # the same initial weights on every rank
    model, tok = tu.load_policy(cfg.model, device, cfg.seed)  # sharded under torchrun
    builtin = not cfg.data
    reward_fn = tu.load_reward_fn(cfg.eval_reward, builtin)

    # data: tokenize with exact prompt/response boundaries, report truncation and skipped records
    if builtin:
        rows, eval_rows = task.builtin_sft_data(cfg.n_train, cfg.seed), []
        eval_prompts = task.builtin_prompts(cfg.eval_prompts, "eval", seed=0)
    else:
        rows, stats = data.load_records(cfg.data, "sft", cfg.skip_bad)
        fu.print0(stats.summary())
        rows, eval_rows = tu.split_heldout(rows, cfg.eval_size, 0.1, cfg.seed, "sft")
        eval_prompts = [r["prompt"] for r in eval_rows]
    trunc = data.TruncationStats()
    encode = lambda r: (data.encode_prompt(tok, r["prompt"], cfg.max_prompt_len, trunc),
                        data.encode_response(tok, r["response"], cfg.max_response_len, trunc))
    train, held = [encode(r) for r in rows], [encode(r) for r in eval_rows]
    fu.print0(f"{len(train)} training examples, {len(held)} held out; {trunc.summary()}")
    if cfg.batch_size % fu.world():
        sys.exit(f"sft.py: --batch_size {cfg.batch_size} must be divisible by the {fu.world()} processes")
    if len(train) < fu.world():  # a rank without rows would have nothing to collate
        sys.exit(f"sft.py: {len(train)} training example(s) for {fu.world()} processes; every process needs "
                 "at least one (lower --eval_size, or use fewer processes)")
    data.check_context(max(len(p) + len(r) for p, r in train + held), model.config, "prompt + response")

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    metrics_path = tu.start_metrics(cfg.out_dir, cfg)

    def evaluate():  # held-out reward of samples (temperature 1) and greedy; {} without a reward
        return tu.evaluate_policy(model, None, tok, eval_prompts, device, cfg.seed, cfg.max_new_tokens, reward_fn,
                                  max_prompt_len=cfg.max_prompt_len) if reward_fn else {}
    before = evaluate()
    if before:
        fu.print0(f"before training: held-out reward {before['reward']:.3f} ± {before['reward_stderr']:.3f} "
                  f"(greedy {before['reward_greedy']:.3f})")

    t0, order, cursor, epoch = time.time(), [], 0, 0
    per_rank = cfg.batch_size // fu.world()
    bar = tqdm(range(cfg.steps), desc="sft", disable=fu.rank() != 0)
    for step in bar:
        if cursor + cfg.batch_size > len(order):  # new epoch: the same shuffle on every rank
            order, cursor, epoch = list(range(len(train))), 0, epoch + 1
            tu.python_rng(cfg.seed, "sft/order", epoch).shuffle(order)
        idx = order[cursor:cursor + cfg.batch_size][fu.rank()::fu.world()][:per_rank]
        cursor += cfg.batch_size
        batch = data.collate_right([train[i][0] for i in idx], [train[i][1] for i in idx], tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        T = int(batch["response_len"].max())
        mask = data.response_mask(batch["response_len"], T)
        n_tokens = fu.all_reduce_sum(mask.sum().detach().clone()).item()  # global response-token count
        logp, _ = data.response_logprobs(model, batch, T)
        loss = sft_loss(logp, mask, n_tokens)

        for g in opt.param_groups:
            g["lr"] = tu.lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = fu.grad_norm_clip(model, cfg.grad_clip)
        opt.step()

        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            m = fu.reduce_metrics({"train/loss": loss.item() / fu.world()}, device)
            m["train/loss"] *= fu.world()  # loss is a per-rank share of the global mean: sum, don't average
            m.update({"step": step, "train/grad_norm": gnorm, "train/lr": opt.param_groups[0]["lr"],
                      "time/seconds": time.time() - t0})
            fu.append_jsonl(metrics_path, m)
            bar.set_postfix(loss=f"{m['train/loss']:.3f}")

    summary = {"train/steps": cfg.steps, "train/seconds": time.time() - t0, **tu.eval_summary(before, evaluate())}
    if held:
        summary["eval/nll"] = eval_nll(model, held, tok.pad_token_id, device)
    checkpoint.save_hf(model, tok, cfg.out_dir)
    tu.finish(cfg.out_dir, summary)
    fu.print0(f"saved to {cfg.out_dir}")
    fu.cleanup()
    return summary


@torch.no_grad()
def eval_nll(model, examples, pad_id: int, device, batch_size: int = 16) -> float:
    """Response-token mean NLL over held-out examples (each rank its shard, summed over ranks)."""
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    mine = examples[fu.rank()::fu.world()]  # this rank's strided share
    n_batches = math.ceil(math.ceil(len(examples) / fu.world()) / batch_size)  # same on every rank
    for j in range(n_batches):
        chunk = mine[j * batch_size:(j + 1) * batch_size]
        weight = 1.0 if chunk else 0.0  # a rank with nothing left still joins the FSDP collectives
        batch = {k: v.to(device) for k, v in data.collate_right(*zip(*(chunk or examples[:1])), pad_id).items()}
        T = int(batch["response_len"].max())
        mask = data.response_mask(batch["response_len"], T)
        logp, _ = data.response_logprobs(model, batch, T)
        tot += weight * torch.stack([-(logp * mask).sum().double(), mask.sum().double()])
    model.train()
    fu.all_reduce_sum(tot)
    return (tot[0] / tot[1]).item()


if __name__ == "__main__":
    try:
        main(fu.parse_config(Config))
    except data.DataError as e:  # bad input: one clear line, no traceback
        sys.exit(f"sft.py: {e}")
