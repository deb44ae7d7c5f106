"""ppo_baseline.py — standard RLHF, the baseline DVPO is compared against: actor-critic PPO with GAE,
scored by a frozen Bradley-Terry reward model (reward_model.py; docs/algorithm.md §6). Same rollout,
clipped policy loss, normalization, hyperparameters and logging as dvpo.py (the algorithm pieces are
imported from it), so the only differences are the ones the paper (arXiv:2502.16944v1) claims matter:
a reward model instead of a GVM, and a trained critic.

Per step:
  1. Rollout: y ~ π_θ(·|x) with a KV cache (left-padded prompts, cut at the first EOS); one response
     per prompt.
  2. Frozen forwards, once per rollout batch: old log-probs (π_θ), reference log-probs (π_ref), the
     reward model's score r(x, y) at the last response token, and the critic's old values V_t (a value
     head on every position, V_t = u_{P+t-2}: the value chain's w_{t-1}).
  3. KL penalty as a per-token reward: r^KL_t = -β (log π_θ(y_t) - log π_ref(y_t)).
  4. Advantages: r_t = r^KL_t + [t = T] r(x, y), GAE(γ, λ) with the critic's V_t -> A_t, returns
     R_t = A_t + V_t; A whitened over the global batch (masked batch normalization).
  5. E epochs × minibatches of the clipped objective                                        (Eq. 3)
       L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),  ρ_t = π_θ(y_t) / π_old(y_t)
     plus the critic's clipped value loss, with its own optimizer:
       L_V = ½ mean_t max((V_t - R_t)², (V_old,t + clip(V_t - V_old,t, ±c) - R_t)²)
  What DVPO removes from ppo_baseline.py: the reward-model forward and the critic (its forward,
  value loss, backward and optimizer). `diff dvpo.py ppo_baseline.py` shows exactly that.
  Positions (which entry of which tensor is read where): model.py's docstring, docs/algorithm.md §1.

Launch:
  python ppo_baseline.py                         # built-in task: out/sft + out/rm -> out/ppo
  python ppo_baseline.py --model <hub id or path> --rm out/rm --prompts prompts.jsonl
  torchrun --nproc_per_node 8 ppo_baseline.py --model <path> --rm <path> --prompts prompts.jsonl
"""
from __future__ import annotations

import os
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
import train_utils as tu
from dvpo import gae_with_terminal_reward, kl_controller, masked_batch_norm, masked_mean, ppo_clip_loss

RM_CONFIG = "rm_config.json"  # the frozen reward model's config: the value scale (reward_model.py)
CRITIC_CONFIG = "critic_config.json"  # PPO only: the critic's folder, saved with the policy


@dataclass
class Config:
    model: str = "out/sft"  # initial policy (and frozen reference): hub id or path
    rm: str = "out/rm"  # frozen reward model folder (reward_model.py); the critic starts from it too
    prompts: str = ""  # prompts JSONL/JSON ({prompt} or {messages}); empty = built-in task
    out_dir: str = "out/ppo"
    steps: int = 40  # rollout batches (PPO iterations)
    batch_size: int = 64  # prompts per rollout, global
    minibatch_size: int = 32  # sequences per optimizer step, global
    micro_batch_size: int = 32  # sequences per forward/backward on one rank (gradient accumulation)
    ppo_epochs: int = 4
    lr: float = 2e-4  # use ~1e-6 for real models (paper App. A: 2e-6)
    critic_lr: float = 2e-4  # PPO only: the critic's learning rate (same schedule)
    warmup_steps: int = 10  # optimizer steps
    grad_clip: float = 1.0
    clip_eps: float = 0.2  # PPO clip ε
    value_clip: float = 0.2  # PPO only: clip range of the value loss (around the rollout-time values)
    kl_beta: float = 0.1  # KL penalty β on unit-scale rewards: the frontier's best for both (docs/results.md)
    normalize_reward: bool = True  # divide the reward by its value model's held-out std (docs/algorithm.md §7)
    kl_target: float = 0.0  # > 0: adaptive β (Ziegler et al. 2019) steering the KL to this value
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95  # GAE λ
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16  # use 512-1024 for real models
    max_prompt_len: int = 512
    gradient_checkpointing: bool = False
    frozen_dtype: str = "auto"  # frozen models: auto = bfloat16 on CUDA, float32 on CPU; or float32 / bfloat16
    eval_prompts: int = 1024  # held-out prompts for the before/after evaluation (0 = none)
    eval_reward: str = ""  # module:function f(prompt, response) -> float; empty = built-in gold reward
    save_every: int = 20  # steps between checkpoints (0 = only at the end); docs/checkpoints.md
    resume: str = "no"  # no: start fresh, refused over a checkpoint | auto: resume if there is one | yes: must resume
    overwrite: bool = False  # start fresh although out_dir holds a checkpoint (deletes it and metrics.jsonl)
    log_every: int = 1
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------------------------
# Pure functions: the critic's values and its clipped value loss (docs/algorithm.md §6)

def critic_values(critic, batch: dict, T: int) -> torch.Tensor:
    """V_t = V(s_t) for t = 1..T: the critic's value at the last token of s_t = x ⊕ y_<t, i.e. at
    position P+t-2 (the value chain's w_{t-1}); (B, T), a fixed width T for every micro-batch."""
    u = critic(batch["input_ids"], batch["attention_mask"]).float()  # (B, L)
    return model.gather_response(u, batch["prompt_len"] - 1, T)


def value_loss_clipped(values, old_values, returns, mask, clip: float, n_tokens) -> torch.Tensor:
    """½ Σ max((V - R)², (V_old + clip(V - V_old, ±c) - R)²) / n_tokens; values, old_values, returns,
    mask: (B, T). Loss convention: this rank's share of the global token mean, as ppo_clip_loss."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * (torch.max((values - returns) ** 2, (v_clipped - returns) ** 2) * mask).sum() / n_tokens


# ----------------------------------------------------------------------------------------------
# The step: score a rollout with the frozen models and the critic, then update the policy and the critic

@torch.no_grad()
def init_critic(critic, scale: float):
    """The critic starts as the reward model, on the unit scale of the returns it will fit: the score
    is divided by `scale` (docs/algorithm.md §7), so its value head is too."""
    critic.value_head.weight.div_(scale)
    critic.value_head.bias.div_(scale)


def score(policy, ref, rm, critic, batch: dict, beta: float, scale: float, cfg: Config, device) -> dict:
    """Steps 2-4: the frozen forwards and the critic's old values, once per rollout batch (reused by
    every PPO epoch), the KL penalty, GAE and the returns. `scale`: the RM's held-out std (1 = raw
    scores). Returns mask, old_logp, kl, old_values, returns, adv (B, T) and the RM score (B,), divided by scale."""
    T = batch["response"].shape[1]
    mask = data.response_mask(batch["response_len"], T)  # (B, T)
    old_logp = model.frozen_logprobs(policy, batch, T, cfg.temperature)
    ref_logp = model.frozen_logprobs(ref, batch, T, cfg.temperature)
    with torch.inference_mode():  # PPO only: the reward model
        rm_score = model.terminal_values(rm, batch).clone() / scale  # r(x, y) on a unit scale (§7), (B,)
        fu.reshard(rm)  # FSDP2 keeps the root gathered after forward: free it
    with torch.no_grad():  # PPO only: the critic is trained, so no_grad, not inference_mode (model.frozen_logprobs)
        old_values = critic_values(critic, batch, T) * mask  # V_t = w_{t-1}
        fu.reshard(critic)
    kl = (old_logp - ref_logp) * mask  # k1 estimator
    r_kl = -beta * kl
    adv_raw = gae_with_terminal_reward(old_values, rm_score, r_kl, mask, cfg.gamma, cfg.lam)  # the critic's V_t
    returns = (adv_raw + old_values) * mask  # PPO only: the critic's targets
    adv = masked_batch_norm(adv_raw, mask)
    return {"mask": mask, "old_logp": old_logp, "kl": kl, "score": rm_score, "old_values": old_values,
            "returns": returns, "adv": adv}


def update(policy, critic, opt, critic_opt, batch: dict, sc: dict, cfg: Config, step: int,
           opt_step: int) -> tuple[dict, int]:
    """Step 5: E epochs × minibatches × micro-batches (gradient accumulation) of the clipped loss,
    and (PPO only) the critic's clipped value loss. Returns the step's statistics (lists of detached
    0-d tensors: no host sync until they are logged) and the new optimizer-step count."""
    world = fu.world()
    per_rank = cfg.batch_size // world
    mb_rank = cfg.minibatch_size // world
    micro = min(cfg.micro_batch_size, mb_rank)
    mask = sc["mask"]
    T = mask.shape[1]
    total = cfg.steps * cfg.ppo_epochs * (per_rank // mb_rank)  # optimizer steps of the run (LR schedule)
    stats = {"policy_loss": [], "clipfrac": [], "approx_kl": [], "entropy": [], "grad_norm": [],
             "value_loss": [], "critic_grad_norm": []}
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(per_rank, generator=tu.torch_rng(cfg.seed, "minibatch", step, epoch))
        for mb in range(0, per_rank, mb_rank):
            mb_idx = perm[mb:mb + mb_rank]
            n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone())  # all-reduce: global minibatch tokens
            lr_now = tu.lr_at(opt_step, total, cfg.warmup_steps, 1.0)
            for o, base in ((opt, cfg.lr), (critic_opt, cfg.critic_lr)):  # PPO only: the critic's optimizer
                for g in o.param_groups:
                    g["lr"] = base * lr_now
            opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            mb_loss = torch.zeros((), device=mask.device)  # Σ over micro-batches of this rank's loss shares
            mb_vloss = torch.zeros((), device=mask.device)  # PPO only: the same for the value loss
            for mi in range(0, mb_rank, micro):
                for m in (policy, critic):  # FSDP2: reduce-scatter after the last micro-batch only
                    fu.grad_sync(m, mi + micro >= mb_rank)
                i = mb_idx[mi:mi + micro].to(mask.device)
                sub = {k: batch[k][i] for k in model.BATCH_KEYS}
                logp, entropy = model.response_logprobs(policy, sub, T, cfg.temperature)
                loss, s = ppo_clip_loss(logp, sc["old_logp"][i], sc["adv"][i], mask[i], cfg.clip_eps, n_tokens)
                (loss * world).backward()  # DDP/FSDP average gradients over ranks: undo it
                values = critic_values(critic, sub, T)  # PPO only: the value loss
                vloss = value_loss_clipped(values, sc["old_values"][i], sc["returns"][i], mask[i], cfg.value_clip,
                                           n_tokens)
                (vloss * world).backward()  # DDP/FSDP average gradients over ranks: undo it
                mb_loss += loss.detach()
                mb_vloss += vloss.detach()
                stats["clipfrac"].append(s["clipfrac"])
                stats["approx_kl"].append(s["approx_kl"])
                stats["entropy"].append(masked_mean(entropy.detach(), mask[i]))
            stats["policy_loss"].append(mb_loss * world)  # its mean over ranks is the global minibatch loss
            stats["value_loss"].append(mb_vloss * world)
            stats["grad_norm"].append(fu.grad_norm_clip(policy, cfg.grad_clip))  # all-reduce under FSDP2
            stats["critic_grad_norm"].append(fu.grad_norm_clip(critic, cfg.grad_clip))
            opt.step()
            critic_opt.step()
            opt_step += 1
    opt.zero_grad(set_to_none=True)  # no gradients held through the next rollout and frozen forwards
    critic_opt.zero_grad(set_to_none=True)
    # the norms are all-reduced, so every rank agrees (and stops together); CPU-GPU sync
    tu.check_finite(torch.stack(stats["grad_norm"]), "gradient norm (policy loss)", step + 1)
    tu.check_finite(torch.stack(stats["critic_grad_norm"]), "gradient norm (value loss)", step + 1)
    return stats, opt_step


# ----------------------------------------------------------------------------------------------
# main: the recipe

def main(cfg: Config):
    device = fu.setup(cfg.device)
    for path, cmd in ((cfg.model, "python sft.py"), (cfg.rm, "python reward_model.py")):
        if path.startswith("out/") and not os.path.exists(path):
            sys.exit(f"ppo_baseline.py: {path} is missing; run `{cmd}` first")
    tu.check_batch_sizes(cfg.batch_size, cfg.minibatch_size, cfg.micro_batch_size, fu.world())
    tu.seed_everything(cfg.seed)
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    resume = checkpoint.resume_or_fresh(ckpt, cfg.resume, cfg.overwrite, "ppo_baseline.py")  # recovers the newest
    metrics_path = tu.start_metrics(cfg.out_dir, vars(cfg), keep=resume)

    # models: the trained policy and critic (fp32 master weights) and the frozen ones in frozen_dtype, each rank
    # loading only its shards (FSDP2 under torchrun: fully_shard per block, then root)
    frozen_dtype = model.frozen_dtype(cfg.frozen_dtype, device)
    policy, tok = model.load_policy(cfg.model, device)  # on resume, load_checkpoint overwrites its weights
    ref, _ = model.load_policy(cfg.model, device, dtype=frozen_dtype, frozen=True)
    rm, _, rcfg = model.load_value_model(cfg.rm, RM_CONFIG, "train one with `python reward_model.py`", device,
                                         dtype=frozen_dtype, frozen=True)  # PPO only: the frozen reward model
    critic, _, _ = model.load_value_model(cfg.rm, RM_CONFIG, "a broken reward model", device)  # PPO only
    scale = model.value_scale(rcfg, cfg.normalize_reward, cfg.rm)
    if not resume:
        init_critic(critic, scale)  # on the sharded critic: an elementwise op on this rank's shards
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        critic.backbone.gradient_checkpointing_enable()
    policy.train()
    critic.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)  # PPO only

    # prompts: each rank keeps its own shard
    my_texts, my_prompts, eval_prompts, builtin = evaluation.load_prompts(
        cfg.prompts, tok, cfg.steps * cfg.batch_size, cfg.eval_prompts, cfg.max_prompt_len, cfg.seed,
        data.TruncationStats())
    reward_fn = evaluation.load_reward_fn(cfg.eval_reward, builtin)

    def evaluate():  # held-out reward and KL to the reference, before and after training
        return evaluation.evaluate_policy(policy, ref, tok, eval_prompts, device, cfg.seed, cfg.max_new_tokens,
                                          reward_fn, cfg.temperature, cfg.top_p, cfg.max_prompt_len)

    data.check_context(max(map(len, my_prompts)) + cfg.max_new_tokens, policy.config, "prompt + max_new_tokens")

    state = {"step": 0, "kl_beta": cfg.kl_beta, "opt_step": 0, "before": None}
    trained = {"policy": (policy, opt), "critic": (critic, critic_opt)}
    if resume:
        checkpoint.load_checkpoint(ckpt, state, trained)
        checkpoint.trim_metrics(metrics_path, state["step"])
        fu.print0(f"resumed from {ckpt} at step {state['step']}")
    if state["before"] is None:
        state["before"] = evaluate()
    fu.print0("before: " + (" | ".join(f"{k} {v:.4f}" for k, v in state["before"].items()) or "no held-out prompts"))

    per_rank = cfg.batch_size // fu.world()
    t_start = time.time()
    bar = tqdm(range(state["step"], cfg.steps), desc="ppo", disable=fu.rank() != 0,
               initial=state["step"], total=cfg.steps)
    for step in bar:
        t0 = time.time()
        gen = tu.torch_rng(cfg.seed, "rollout", step, fu.rank(), device=device)  # every draw: (seed, step, rank)
        idx = [(step * per_rank + i) % len(my_prompts) for i in range(per_rank)]

        # 1. rollout
        batch = model.rollout(policy, [my_prompts[i] for i in idx], tok, cfg.max_new_tokens, cfg.temperature,
                              cfg.top_p, gen, device)
        t_gen = time.time() - t0

        # 2-4. frozen forwards (PPO only: the reward model and the critic), KL penalty, GAE with the critic
        sc = score(policy, ref, rm, critic, batch, state["kl_beta"], scale, cfg, device)
        tu.check_finite(sc["adv"], "advantage", step + 1)  # from global batch statistics: every rank agrees
        t_score = time.time() - t0 - t_gen

        # 5. PPO epochs × minibatches × micro-batches: the policy loss, plus the critic's value loss (PPO only)
        stats, state["opt_step"] = update(policy, critic, opt, critic_opt, batch, sc, cfg, step, state["opt_step"])

        # 6. bookkeeping: logs, KL controller, checkpoint
        mask = sc["mask"]
        dt = time.time() - t0
        m = {"rm/score": sc["score"].mean(), "critic/value_prompt": sc["old_values"][:, 0].mean(),
             "kl": sc["kl"].sum(1).mean(),
             "response_len": batch["response_len"].float().mean(), "truncated": batch["truncated"].float().mean(),
             "tokens_per_s": mask.sum() * fu.world() / dt, **tu.mean_of(stats)}  # mean_of: CPU-GPU sync
        if reward_fn is not None:  # reporting only, never in a loss
            r = evaluation.rewards(reward_fn, [my_texts[i] for i in idx], batch["response"], tok)
            m["reward"] = sum(r) / len(r)  # value drift: does the frozen RM still rank this policy's samples?
            corr = evaluation.rank_correlation(sc["score"], torch.tensor(r))
            m["rm/reward_corr"] = corr  # nan when every reward of the batch is equal: left out of the mean
        m = tu.step_row(m, device, step=step + 1, lr=opt.param_groups[0]["lr"], **{
            "time/step_s": dt, "time/generate_s": t_gen, "time/score_s": t_score})  # all-reduce: every rank, same keys
        if cfg.kl_target > 0:
            state["kl_beta"] = kl_controller(state["kl_beta"], m["kl"], cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
        m["kl_beta"] = state["kl_beta"]
        state["step"] = step + 1
        if "rm/reward_corr" in m:  # value drift: the last step's value goes to summary.json
            state["reward_corr"] = m["rm/reward_corr"]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            tu.append_jsonl(metrics_path, m)
        bar.set_postfix(**({"reward": f"{m['reward']:.3f}"} if "reward" in m else {}), rm=f"{m['rm/score']:.3f}",
                        kl=f"{m['kl']:.3f}", vloss=f"{m['value_loss']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint.save_checkpoint(ckpt, tok, state, trained)  # a collective: rank 0 writes

    # final evaluation and outputs
    summary = {"train/steps": state["step"], "train/seconds": time.time() - t_start,
               "rm/pairwise_accuracy": rcfg.get("eval/pairwise_accuracy", float("nan")), "rm/scale": scale,
               **evaluation.eval_summary(state["before"], evaluate())}
    if "reward_corr" in state:
        summary["rm/reward_corr_final"] = state["reward_corr"]
    checkpoint.save_checkpoint(ckpt, tok, state, trained)
    checkpoint.save_hf(policy, tok, cfg.out_dir)  # a collective: rank 0 gathers and writes
    checkpoint.save_value_model(critic, tok, os.path.join(cfg.out_dir, "critic"), CRITIC_CONFIG,  # PPO only
                                {"role": "critic", "gamma": cfg.gamma, "lam": cfg.lam})
    tu.finish(cfg.out_dir, summary)
    fu.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError, tu.NonFiniteError) as e:  # bad input, a flag or a NaN: one line
        sys.exit(f"ppo_baseline.py: {e}")
