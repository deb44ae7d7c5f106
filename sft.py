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
import evaluation
import fsdp_utils as fu
import model
import task
import train_utils as tu


@dataclass
class Config:
    model: str = ""  # hub id or local path; empty = the built-in tiny Llama
    data: str = ""  # SFT JSONL/JSON file ({prompt, response} or {messages}); empty = built-in demos
    out_dir: str = "out/sft"
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # sequences per step, global (split over ranks)
    micro_batch_size: int = 64  # sequences per forward/backward on one rank (gradient accumulation); also evaluation
    gradient_checkpointing: bool = False
    grad_sync: str = "every"  # every: reduce-scatter each micro-batch's gradients | last: once per step (faster,
    #                            but an unsharded fp32 gradient of the trained model on every rank meanwhile)
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
    eval_batch_size: int = 64  # held-out prompts generated at once on one rank (memory: their KV cache)
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    log_every: int = 50
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (this rank's GPU under torchrun)
    dist_timeout_min: float = 60  # how long a collective may wait for the other ranks


# ----------------------------------------------------------------------------------------------
# Pure functions: the SFT loss

def sft_loss(logp: torch.Tensor, mask: torch.Tensor, n_tokens) -> torch.Tensor:
    """Next-token NLL on response tokens. logp, mask: (B, T); n_tokens: valid tokens of the global batch.
    Loss convention: this rank's share of the global token mean, Σ_local / n_tokens (the caller
    backpropagates loss * world, since DDP/FSDP average gradients over ranks)."""
    return -(logp * mask).sum() / n_tokens


# ----------------------------------------------------------------------------------------------
# main: the recipe


def main(cfg: Config):
    device = fu.setup(cfg.device, cfg.dist_timeout_min)
    tu.check_choice("grad_sync", cfg.grad_sync, ("every", "last"))
    tu.seed_everything(cfg.seed)  # the same initial weights on every rank
    # FSDP2: sharded under torchrun (fully_shard per block, then root; each rank loads only its shards)
    policy, tok = model.load_policy(cfg.model, device) if cfg.model else task.load_tiny_policy(device, cfg.seed)
    builtin = not cfg.data
    reward_fn = evaluation.load_reward_fn(cfg.eval_reward, builtin)

    # data: tokenize with exact prompt/response boundaries, report truncation and skipped records
    if builtin:
        rows, eval_rows = task.builtin_sft_data(cfg.n_train, cfg.seed), []
        eval_prompts = task.builtin_prompts(cfg.eval_prompts, "eval", seed=0)
    else:
        rows, stats = data.load_records(cfg.data, "sft", cfg.skip_bad)
        fu.print0(stats.summary())
        rows, eval_rows = data.split_heldout(rows, cfg.eval_size, 0.1, cfg.seed, "sft")
        eval_prompts = [r["prompt"] for r in eval_rows]
    trunc = data.TruncationStats()

    def encode(r):  # (prompt ids, response ids)
        return (data.encode_prompt(tok, r["prompt"], cfg.max_prompt_len, trunc),
                data.encode_response(tok, r["response"], cfg.max_response_len, trunc))

    train = [encode(r) for r in rows]
    held = [encode(r) for r in eval_rows]
    fu.print0(f"{len(train)} training examples, {len(held)} held out; {trunc.summary()}")
    if cfg.batch_size % fu.world():
        sys.exit(f"sft.py: --batch_size {cfg.batch_size} must be divisible by the {fu.world()} processes")
    if len(train) < fu.world():  # a rank without rows would have nothing to collate
        sys.exit(f"sft.py: {len(train)} training example(s) for {fu.world()} processes; every process needs "
                 "at least one (lower --eval_size, or use fewer processes)")
    data.check_context(max(len(p) + len(r) for p, r in train + held), policy.config, "prompt + response")

    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(policy)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    metrics_path = tu.start_metrics(cfg.out_dir, vars(cfg))

    def evaluate():  # held-out reward of samples (temperature 1) and greedy; {} without a reward
        if not reward_fn:
            return {}
        return evaluation.evaluate_policy(policy, None, tok, eval_prompts, device, cfg.seed, cfg.max_new_tokens,
                                          reward_fn, max_prompt_len=cfg.max_prompt_len,
                                          batch_size=cfg.eval_batch_size, micro_batch_size=cfg.micro_batch_size)
    before = evaluate()
    if before:
        fu.print0(f"before training: held-out reward {before['reward']:.3f} ± {before['reward_stderr']:.3f} "
                  f"(greedy {before['reward_greedy']:.3f})")

    t0 = time.time()
    order, cursor, epoch = [], 0, 0  # the shuffled example order of the current epoch, and where we are in it
    world = fu.world()
    per_rank = cfg.batch_size // world
    micro = min(cfg.micro_batch_size, per_rank)
    bar = tqdm(range(cfg.steps), desc="sft", disable=fu.rank() != 0)
    for step in bar:
        if cursor + cfg.batch_size > len(order):  # new epoch: the same shuffle on every rank
            order = list(range(len(train)))
            cursor = 0
            epoch += 1
            tu.python_rng(cfg.seed, "sft/order", epoch).shuffle(order)
        idx = order[cursor:cursor + cfg.batch_size][fu.rank()::world][:per_rank]  # this rank's rows
        cursor += cfg.batch_size
        n_local = torch.tensor(float(sum(len(train[i][1]) for i in idx)), device=device)
        n_tokens = fu.all_reduce_sum(n_local)  # all-reduce: the response tokens of the step's global batch

        for g in opt.param_groups:
            g["lr"] = tu.lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)  # Σ over micro-batches of this rank's loss shares
        for mi in range(0, len(idx), micro):
            fu.grad_sync(policy, cfg.grad_sync == "every" or mi + micro >= len(idx))  # FSDP2 reduce-scatter
            sub = idx[mi:mi + micro]
            batch = data.collate_right([train[i][0] for i in sub], [train[i][1] for i in sub], tok.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            T = max(len(train[i][1]) for i in sub)
            mask = data.response_mask(batch["response_len"], T)
            logp, _ = model.response_logprobs(policy, batch, T)
            loss = sft_loss(logp, mask, n_tokens)
            (loss * world).backward()  # DDP/FSDP average gradients over ranks: undo it
            step_loss += loss.detach()
        gnorm = fu.grad_norm_clip(policy, cfg.grad_clip)  # all-reduce under FSDP2
        opt.step()

        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            # the global loss is the sum of the ranks' shares: the mean over ranks of share × world
            m = fu.reduce_metrics({"train/loss": step_loss * world, "train/grad_norm": gnorm}, device)
            m.update({"step": step, "train/lr": opt.param_groups[0]["lr"], "time/seconds": time.time() - t0})
            tu.append_jsonl(metrics_path, m)
            bar.set_postfix(loss=f"{m['train/loss']:.3f}")

    summary = {"train/steps": cfg.steps, "train/seconds": time.time() - t0,
               **evaluation.eval_summary(before, evaluate())}
    if held:
        summary["eval/nll"] = eval_nll(policy, held, tok.pad_token_id, device, cfg.micro_batch_size)
    checkpoint.save_hf(policy, tok, cfg.out_dir)  # a collective: rank 0 gathers and writes
    tu.finish(cfg.out_dir, summary)
    fu.print0(f"saved to {cfg.out_dir}")
    fu.cleanup()
    return summary


@torch.no_grad()
def eval_nll(policy, examples, pad_id: int, device, batch_size: int) -> float:
    """Response-token mean NLL over held-out examples (each rank its shard, summed over ranks)."""
    policy.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    mine = examples[fu.rank()::fu.world()]  # this rank's strided share
    n_batches = math.ceil(math.ceil(len(examples) / fu.world()) / batch_size)  # same on every rank
    for j in range(n_batches):
        chunk = mine[j * batch_size:(j + 1) * batch_size]
        weight = 1.0 if chunk else 0.0  # a rank with nothing left still joins the FSDP collectives
        batch = {k: v.to(device) for k, v in data.collate_right(*zip(*(chunk or examples[:1])), pad_id).items()}
        T = int(batch["response_len"].max())
        mask = data.response_mask(batch["response_len"], T)
        logp, _ = model.response_logprobs(policy, batch, T)
        tot += weight * torch.stack([-(logp * mask).sum().double(), mask.sum().double()])
    policy.train()
    fu.all_reduce_sum(tot)  # all-reduce: every rank
    return (tot[0] / tot[1]).item()


if __name__ == "__main__":
    try:
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError) as e:  # bad input or flag: one clear line, no traceback
        sys.exit(f"sft.py: {e}")
