"""dpo_baseline.py — Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), the offline
baseline of the paper's Tables 1-2 (arXiv:2502.16944v1): the policy trained directly on the GVM's
preference pairs and split, with no reward model and no RL (docs/algorithm.md §12). `diff
reward_model.py dpo_baseline.py` shows the difference: the "reward" of a response is the policy's
log-ratio to a frozen reference summed over the response, not a value head read at its last token.

  1. Implicit reward: r_θ(x, y) = β (log π_θ(y|x) - log π_ref(y|x)),  log π(y|x) = Σ_t log π(y_t|s_t).
  2. Loss: L = -log σ(r_θ(x, y_chosen) - r_θ(x, y_rejected)), a mean over the pairs of the global batch;
     the reference's log-probs are computed once per batch, without gradient.
  3. Evaluation, as the RL scripts evaluate (the frontier's axes): the held-out gold reward (or
     --eval_reward) of sampled and greedy responses and the KL to the reference per response, before
     and after; and the implicit reward's held-out pairwise accuracy.
  β is DPO's own: how far the policy may move from the reference. It is not the RL scripts' KL β, and
  DPO is compared with them on the gold-vs-KL frontier, over a sweep of its β (scripts/frontier.py).

Launch:
  python dpo_baseline.py                         # built-in task: out/sft + out/gvm's pairs -> out/dpo
  python dpo_baseline.py --data prefs.jsonl --model <sft path> --prompts prompts.jsonl --beta 0.1
  torchrun --nproc_per_node 8 dpo_baseline.py --data prefs.jsonl --model <sft path>
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
import evaluation
import fsdp_utils as fu
import model
import train_utils as tu


@dataclass
class Config:
    model: str = "out/sft"  # initial policy (and frozen reference): hub id or path
    data: str = ""  # preference JSONL/JSON file; empty = the GVM's pairs (out/gvm/pairs_train.jsonl, pairs_eval.jsonl)
    eval_data: str = ""  # held-out file of the same kind; empty = split eval_frac off --data
    eval_frac: float = 0.05
    out_dir: str = "out/dpo"
    epochs: int = 2
    batch_size: int = 32  # pairs per optimizer step, global
    micro_batch_size: int = 32  # pairs per forward/backward on one rank; also evaluation
    gradient_checkpointing: bool = False
    grad_sync: str = "every"  # every: reduce-scatter each micro-batch's gradients | last: once per step (faster,
    #                            but an unsharded fp32 gradient of the trained model on every rank meanwhile)
    lr: float = 1e-4  # use ~5e-7 for real models
    warmup_steps: int = 10
    grad_clip: float = 1.0
    beta: float = 0.1  # DPO only: the implicit reward's scale (larger: stay closer to the reference)
    max_prompt_len: int = 512
    max_response_len: int = 512
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    frozen_dtype: str = "auto"  # frozen models: auto = bfloat16 on CUDA, float32 on CPU; or float32 / bfloat16
    # evaluation of the policy, as the RL scripts evaluate it
    prompts: str = ""  # prompts JSONL/JSON ({prompt} or {messages}) whose held-out split is evaluated; empty = built-in
    eval_prompts: int = 1024  # held-out prompts for the before/after evaluation (0 = none)
    eval_batch_size: int = 64  # held-out prompts generated at once on one rank (memory: their KV cache)
    eval_reward: str = ""  # module:function f(prompt, response) -> float; empty = built-in gold reward
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16  # use 512-1024 for real models
    log_every: int = 20
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (this rank's GPU under torchrun)
    dist_timeout_min: float = 60  # how long a collective may wait for the other ranks


# ----------------------------------------------------------------------------------------------
# Pure functions: the DPO loss (docs/algorithm.md §12)

def sequence_logprobs(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t|s_t) over valid response tokens: logp, mask (B, T) -> (B,)."""
    return (logp * mask).sum(1)


def dpo_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float,
             n_pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ -log σ(β[(log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))]) / n_pairs over this rank's
    pairs; all (B,) sequence log-probs (sequence_logprobs). Loss convention: this rank's share of the global
    mean, Σ_local / n_pairs with n_pairs the pairs of the global batch (the caller backpropagates
    loss * world). Also returns the implicit reward margin r_θ(y_c) - r_θ(y_r), (B,), detached."""
    margin = beta * ((logp_c - ref_c) - (logp_r - ref_r))
    return (-F.logsigmoid(margin)).sum() / n_pairs, margin.detach()


# ----------------------------------------------------------------------------------------------
# The step: one optimizer step of DPO on this rank's pairs of a global batch

def train_step(policy, ref, opt, examples: list[dict], idx: list[int], cfg: Config, step: int, total: int,
               pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on pairs idx, this rank's pairs of the step's global batch: the learning rate,
    the DPO loss in micro-batches (gradient accumulation), clipping, the optimizer step. Returns this
    rank's summed loss shares, the gradient norm before clipping (0-d tensors: no host sync) and the
    implicit reward margins of this rank's pairs."""
    world = fu.world()
    micro = min(cfg.micro_batch_size, cfg.batch_size // world)

    for g in opt.param_groups:
        g["lr"] = tu.lr_at(step, total, cfg.warmup_steps, cfg.lr)
    opt.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)  # Σ over micro-batches of this rank's loss shares
    margins = []
    for mi in range(0, len(idx), micro):
        fu.grad_sync(policy, cfg.grad_sync == "every" or mi + micro >= len(idx))  # FSDP2 reduce-scatter
        batch = data.collate_pairs(examples, idx[mi:mi + micro], pad_id)
        batch = {key: v.to(device) for key, v in batch.items()}

        # the policy's and the reference's sequence log-probs of chosen and rejected rows
        T = max(len(examples[i][k]) for i in idx[mi:mi + micro] for k in ("chosen", "rejected"))
        mask = data.response_mask(batch["response_len"], T)
        logp = sequence_logprobs(model.response_logprobs(policy, batch, T)[0], mask)  # (2B,)
        ref_logp = sequence_logprobs(model.frozen_logprobs(ref, batch, T, 1.0), mask)  # DPO only
        loss, margin = dpo_loss(logp[0::2], logp[1::2], ref_logp[0::2], ref_logp[1::2], cfg.beta,
                                cfg.batch_size)  # a mean over the pairs of the global batch
        (loss * world).backward()  # DDP/FSDP average gradients over ranks: undo it
        step_loss += loss.detach()
        margins.append(margin)
    gnorm = fu.grad_norm_clip(policy, cfg.grad_clip)  # all-reduce under FSDP2
    opt.step()
    return step_loss, gnorm, torch.cat(margins)


# ----------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def implicit_reward_accuracy(policy, ref, examples, pad_id, device, beta: float, micro_batch_size: int) -> dict:
    """Held-out DPO loss and pairwise accuracy of the implicit reward r_θ(chosen) > r_θ(rejected). Each rank
    scores its strided share of the pairs in micro-batches; results all-gathered, the same on every rank."""
    policy.eval()
    per_example = {}  # example index -> (loss of the pair, margin)
    for idx in evaluation.shard_batches(len(examples), micro_batch_size):
        batch = {k: v.to(device) for k, v in data.collate_pairs(examples, idx or [0], pad_id).items()}
        T = int(batch["response_len"].max())  # CPU-GPU sync
        mask = data.response_mask(batch["response_len"], T)
        logp = sequence_logprobs(model.response_logprobs(policy, batch, T)[0], mask)
        ref_logp = sequence_logprobs(model.frozen_logprobs(ref, batch, T, 1.0), mask)
        _, margin = dpo_loss(logp[0::2], logp[1::2], ref_logp[0::2], ref_logp[1::2], beta, 1)
        margin = margin.tolist()  # CPU-GPU sync
        for j, i in enumerate(idx):  # (a dummy batch, idx == [], adds nothing)
            per_example[i] = margin[j]
    fu.reshard(policy)  # FSDP2 keeps the root gathered after forward: free it
    policy.train()
    margins = torch.tensor(evaluation.gather_by_index(per_example), dtype=torch.float64)
    return {"eval/dpo_loss": (-F.logsigmoid(margins)).mean().item(),
            "eval/pairwise_accuracy": evaluation.pairwise_accuracy(margins, torch.zeros_like(margins))}


# ----------------------------------------------------------------------------------------------
# main: the recipe

def main(cfg: Config):
    device = fu.setup(cfg.device, cfg.dist_timeout_min)
    world = fu.world()
    if cfg.batch_size % world:  # every rank needs rows in every batch
        raise tu.ConfigError(f"--batch_size {cfg.batch_size} must be divisible by the {world} processes")
    tu.check_choice("grad_sync", cfg.grad_sync, ("every", "last"))
    tu.seed_everything(cfg.seed)  # the same on every rank
    metrics_path = tu.start_metrics(cfg.out_dir, vars(cfg))
    if cfg.model.startswith("out/") and not os.path.exists(cfg.model):
        sys.exit(f"dpo_baseline.py: no SFT policy at {cfg.model!r}; run `python sft.py` first (or pass --model)")

    # 1. data: preference pairs, the GVM's split
    frozen_dtype = model.frozen_dtype(cfg.frozen_dtype, device)
    policy, tok = model.load_policy(cfg.model, device)  # FSDP2: sharded under torchrun
    ref, _ = model.load_policy(cfg.model, device, dtype=frozen_dtype, frozen=True)  # DPO only: the reference
    train_rows, eval_rows = data.load_pairs(cfg.data, cfg.eval_data, cfg.skip_bad, cfg.eval_frac, cfg.seed)
    trunc = data.TruncationStats()
    train = data.encode_pairs(train_rows, tok, cfg.max_prompt_len, cfg.max_response_len, trunc)
    held = data.encode_pairs(eval_rows, tok, cfg.max_prompt_len, cfg.max_response_len, trunc)
    fu.print0(f"{len(train)} training and {len(held)} held-out preference rows; {trunc.summary()}")
    _, _, eval_prompts, builtin = evaluation.load_prompts(  # DPO trains on pairs: only the held-out prompts
        cfg.prompts, tok, world, cfg.eval_prompts, cfg.max_prompt_len, cfg.seed, data.TruncationStats())
    reward_fn = evaluation.load_reward_fn(cfg.eval_reward, builtin)

    def evaluate():  # held-out reward and KL to the reference, before and after training (as the RL scripts)
        return evaluation.evaluate_policy(policy, ref, tok, eval_prompts, device, cfg.seed, cfg.max_new_tokens,
                                          reward_fn, cfg.temperature, cfg.top_p, cfg.max_prompt_len,
                                          cfg.eval_batch_size, cfg.micro_batch_size)

    # 2. model: the policy, trained in place
    prompt_max = max(len(e["prompt"]) for e in train + held)
    response_max = max(len(e[k]) for e in train + held for k in ("chosen", "rejected"))
    data.check_context(prompt_max + response_max, policy.config, "prompt + response")
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(policy)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = len(train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if total == 0:
        raise data.DataError(f"{len(train)} training pairs is fewer than one batch of {cfg.batch_size}; "
                             "lower --batch_size")
    before = evaluate()
    fu.print0("before: " + (" | ".join(f"{k} {v:.4f}" for k, v in before.items()) or "no held-out prompts"))
    t0 = time.time()
    step = 0
    bar = tqdm(total=total, desc="dpo", disable=fu.rank() != 0)
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        tu.python_rng(cfg.seed, "rm/order", epoch).shuffle(order)  # the same order on every rank (and the RM's)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size][fu.rank()::world]  # this rank's rows

            # 3. DPO: chosen vs rejected, the policy's log-ratio to the reference (train_step)
            step_loss, gnorm, margin = train_step(policy, ref, opt, train, idx, cfg, step, total, tok.pad_token_id,
                                                  device)

            if step % cfg.log_every == 0 or step == total - 1:
                # the global loss is the sum of the ranks' shares: the mean over ranks of share × world
                m = fu.reduce_metrics({"train/dpo_loss": step_loss * world, "train/grad_norm": gnorm,
                                       "train/margin": margin.mean(), "train/accuracy": (margin > 0).float().mean()},
                                      device)
                m.update({"step": step, "epoch": epoch, "train/lr": opt.param_groups[0]["lr"],
                          "time/seconds": time.time() - t0})
                tu.append_jsonl(metrics_path, m)
                bar.set_postfix(dpo_loss=f"{m['train/dpo_loss']:.4f}")
            bar.update(1)
            step += 1
    bar.close()

    # 4. save first, then evaluate: the implicit reward on held-out pairs, the policy on held-out prompts
    checkpoint.save_hf(policy, tok, cfg.out_dir)  # a collective: rank 0 gathers and writes
    summary = {"train/pairs": len(train), "eval/pairs": len(held), "train/steps": total,
               "train/seconds": time.time() - t0, "beta": cfg.beta,
               **implicit_reward_accuracy(policy, ref, held, tok.pad_token_id, device, cfg.beta, cfg.micro_batch_size),
               **evaluation.eval_summary(before, evaluate())}
    tu.finish(cfg.out_dir, summary)
    fu.print0(f"saved to {cfg.out_dir}")
    fu.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError) as e:  # bad input or flag: one clear line, no traceback
        sys.exit(f"dpo_baseline.py: {e}")
