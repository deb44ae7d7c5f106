"""ppo_baseline.py — standard RLHF, the baseline DVPO is compared against: actor-critic PPO with GAE,
scored by a frozen Bradley-Terry reward model (reward_model.py; docs/algorithm.md §6) — or, as a control,
by a GVM's terminal value w_T (--reward gvm:PATH), with a critic that can start from the GVM
(--critic_init; docs/algorithm.md §12). Same rollout,
clipped policy loss, normalization, hyperparameters and logging as dvpo.py (the algorithm pieces are
imported from it), so the only differences are the ones the paper (arXiv:2502.16944v1) claims matter:
a reward model instead of a GVM, and a trained critic.

Per step:
  1. Rollout: y ~ π_θ(·|x) with a KV cache (left-padded prompts, cut at the first EOS); one response
     per prompt.
  2. Frozen forwards, once per rollout batch: old log-probs (π_θ), reference log-probs (π_ref), the
     reward model's score r(x, y) at the last response token, and the critic's old values V_t (a value
     head on every position, V_t = u_{P+t-2}: the value chain's w_{t-1}). The critic starts as the
     reward model, its head on the unit scale of the returns (--critic_init).
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
  python ppo_baseline.py --model <hub id or path> --reward rm:out/rm --prompts prompts.jsonl
  python ppo_baseline.py --reward gvm:out/gvm --critic_init reward          # the controls: PPO on the GVM's w_T
  torchrun --nproc_per_node 8 ppo_baseline.py --model <path> --reward rm:<path> --prompts prompts.jsonl
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

CRITIC_CONFIG = "critic_config.json"  # PPO only: the critic's folder, saved with the policy


@dataclass
class Config:
    model: str = "out/sft"  # initial policy (and frozen reference): hub id or path
    reward: str = "rm:out/rm"  # the frozen scorer: rm:PATH (reward_model.py) or gvm:PATH (gvm.py; its w_T)
    critic_init: str = "reward"  # PPO only: the critic starts as reward (the scorer's model) | sft (--model's
    #                               backbone, zero head) | rm:PATH | gvm:PATH (value pretraining)
    critic_warmup_steps: int = 0  # PPO only: the first steps train the critic alone (the policy waits)
    prompts: str = ""  # prompts JSONL/JSON ({prompt} or {messages}); empty = built-in task
    out_dir: str = "out/ppo"
    steps: int = 40  # rollout batches (PPO iterations)
    batch_size: int = 64  # responses per rollout, global
    minibatch_size: int = 32  # sequences per optimizer step, global
    micro_batch_size: int = 32  # sequences per forward on one rank: training (gradient accumulation) and scoring
    grad_sync: str = "every"  # every: reduce-scatter each micro-batch's gradients | last: once per step (faster,
    #                            but an unsharded fp32 gradient of the trained model on every rank meanwhile)
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
    eval_batch_size: int = 64  # held-out prompts generated at once on one rank (memory: their KV cache)
    eval_reward: str = ""  # module:function f(prompt, response) -> float; empty = built-in gold reward
    save_every: int = 20  # steps between checkpoints (0 = only at the end); docs/checkpoints.md
    resume: str = "no"  # no: start fresh, refused over a checkpoint | auto: resume if there is one | yes: must resume
    overwrite: bool = False  # start fresh although out_dir holds a checkpoint (deletes it and metrics.jsonl)
    log_every: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (this rank's GPU under torchrun)
    dist_timeout_min: float = 60  # how long a collective may wait for the other ranks


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

@torch.no_grad()  # the critic is trained, so no_grad, not inference_mode (see model.frozen_logprobs)
def frozen_critic_values(critic, batch: dict, T: int, micro_batch_size: int) -> torch.Tensor:
    """critic_values before the update, once per rollout batch, in micro-batches: (B, T)."""
    B = batch["input_ids"].shape[0]
    out = [critic_values(critic, {k: batch[k][i:i + micro_batch_size] for k in model.BATCH_KEYS}, T)
           for i in range(0, B, micro_batch_size)]
    fu.reshard(critic)  # FSDP2 keeps the root gathered after forward: free it
    return torch.cat(out)


def load_critic(cfg: Config, device):
    """The trained critic (fp32), sharded under torchrun, started from --critic_init: the scorer's own value
    model (reward; today's PPO: the critic starts as the RM), a GVM or RM folder (gvm:PATH, rm:PATH: value
    pretraining), each with its head on the unit scale of the returns (init_critic), or sft: --model's
    backbone with a zero head (V = 0 at the start). On resume, load_checkpoint then overwrites its weights."""
    if cfg.critic_init == "sft":
        return model.new_value_model(cfg.model, device)
    spec = cfg.reward if cfg.critic_init == "reward" else cfg.critic_init
    critic, _, config = model.load_reward(spec, device, frozen=False)
    init_critic(critic, model.value_scale(config, cfg.normalize_reward, spec))  # elementwise on this rank's shards
    return critic


@torch.no_grad()
def init_critic(critic, scale: float):
    """The critic starts as the reward model, on the unit scale of the returns it will fit: the score
    is divided by `scale` (docs/algorithm.md §7), so its value head is too."""
    critic.value_head.weight.div_(scale)
    critic.value_head.bias.div_(scale)


def score(policy, ref, scorer, critic, batch: dict, beta: float, scale: float, cfg: Config, device) -> dict:
    """Steps 2-4: the frozen forwards and the critic's old values, once per rollout batch (reused by
    every PPO epoch), the KL penalty, GAE and the returns. `scale`: the RM's held-out std (1 = raw
    scores). Returns mask, old_logp, kl, old_values, returns, adv (B, T) and the RM score (B,), divided by scale."""
    T = batch["response"].shape[1]
    mask = data.response_mask(batch["response_len"], T)  # (B, T)
    old_logp = model.frozen_logprobs(policy, batch, T, cfg.temperature, cfg.micro_batch_size)
    ref_logp = model.frozen_logprobs(ref, batch, T, cfg.temperature, cfg.micro_batch_size)
    rm_score = model.frozen_terminal_values(scorer, batch, cfg.micro_batch_size) / scale  # PPO only: r(x, y), (B,)
    old_values = frozen_critic_values(critic, batch, T, cfg.micro_batch_size) * mask  # PPO only: V_t = w_{t-1}
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
    train_policy = step >= cfg.critic_warmup_steps  # PPO only: during the critic's warm-up the policy waits
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
                for m in (policy, critic):  # FSDP2 reduce-scatter
                    fu.grad_sync(m, cfg.grad_sync == "every" or mi + micro >= mb_rank)
                i = mb_idx[mi:mi + micro].to(mask.device)
                sub = {k: batch[k][i] for k in model.BATCH_KEYS}
                logp, entropy = model.response_logprobs(policy, sub, T, cfg.temperature, with_entropy=True)
                loss, s = ppo_clip_loss(logp, sc["old_logp"][i], sc["adv"][i], mask[i], cfg.clip_eps, n_tokens)
                if train_policy:
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
            if train_policy:
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
    device = fu.setup(cfg.device, cfg.dist_timeout_min)
    kind, reward_path = model.parse_reward(cfg.reward)
    for path, cmd in ((cfg.model, "python sft.py"), (reward_path, model.REWARDS[kind][1])):
        if path.startswith("out/") and not os.path.exists(path):
            sys.exit(f"ppo_baseline.py: {path} is missing; run `{cmd}` first")
    tu.check_batch_sizes(cfg.batch_size, cfg.minibatch_size, cfg.micro_batch_size, fu.world())
    tu.check_choice("grad_sync", cfg.grad_sync, ("every", "last"))
    tu.seed_everything(cfg.seed)
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    resume = checkpoint.resume_or_fresh(ckpt, cfg.resume, cfg.overwrite, "ppo_baseline.py")  # recovers the newest
    metrics_path = tu.start_metrics(cfg.out_dir, vars(cfg), keep=resume)

    # models: the trained policy and critic (fp32 master weights) and the frozen ones in frozen_dtype, each rank
    # loading only its shards (FSDP2 under torchrun: fully_shard per block, then root)
    frozen_dtype = model.frozen_dtype(cfg.frozen_dtype, device)
    policy, tok = model.load_policy(cfg.model, device)  # on resume, load_checkpoint overwrites its weights
    ref, _ = model.load_policy(cfg.model, device, dtype=frozen_dtype, frozen=True)
    scorer, _, rcfg = model.load_reward(cfg.reward, device, dtype=frozen_dtype)  # PPO only: the frozen scorer
    scale = model.value_scale(rcfg, cfg.normalize_reward, reward_path)
    if warning := model.chance_warning(rcfg, reward_path):  # a value model at chance: say so before RL
        fu.print0(warning)
    critic = load_critic(cfg, device)  # PPO only; on resume, load_checkpoint overwrites its weights
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(policy)
        model.enable_gradient_checkpointing(critic)
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
                                          reward_fn, cfg.temperature, cfg.top_p, cfg.max_prompt_len,
                                          cfg.eval_batch_size, cfg.micro_batch_size)

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
        sc = score(policy, ref, scorer, critic, batch, state["kl_beta"], scale, cfg, device)
        tu.check_finite(sc["adv"], "advantage", step + 1)  # from global batch statistics: every rank agrees
        t_score = time.time() - t0 - t_gen

        # 5. PPO epochs × minibatches × micro-batches: the policy loss, plus the critic's value loss (PPO only)
        stats, state["opt_step"] = update(policy, critic, opt, critic_opt, batch, sc, cfg, step, state["opt_step"])

        # 6. bookkeeping: logs, KL controller, checkpoint
        mask = sc["mask"]
        dt = time.time() - t0
        m = {f"{kind}/score": sc["score"].mean(), "critic/value_prompt": sc["old_values"][:, 0].mean(),
             "kl": sc["kl"].sum(1).mean(),
             "response_len": batch["response_len"].float().mean(), "truncated": batch["truncated"].float().mean(),
             "tokens_per_s": mask.sum() * fu.world() / dt, **tu.mean_of(stats)}  # mean_of: CPU-GPU sync
        if reward_fn is not None:  # reporting only, never in a loss
            stops = data.stop_token_ids(tok, policy.generation_config)  # the rollout's stop tokens
            r = evaluation.rewards(reward_fn, [my_texts[i] for i in idx], batch["response"], tok, stops)
            m["reward"] = sum(r) / len(r)  # value drift: does the frozen RM still rank this policy's samples?
            corr = evaluation.rank_correlation(sc["score"], torch.tensor(r))
            m[f"{kind}/reward_corr"] = corr  # nan when every reward of the batch is equal: left out of the mean
        m = tu.step_row(m, device, step=step + 1, lr=opt.param_groups[0]["lr"], **{
            "time/step_s": dt, "time/generate_s": t_gen, "time/score_s": t_score})  # all-reduce: every rank, same keys
        if cfg.kl_target > 0:
            state["kl_beta"] = kl_controller(state["kl_beta"], m["kl"], cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
        m["kl_beta"] = state["kl_beta"]
        state["step"] = step + 1
        if f"{kind}/reward_corr" in m:  # value drift: the last step's value goes to summary.json
            state["reward_corr"] = m[f"{kind}/reward_corr"]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            tu.append_jsonl(metrics_path, m)
        bar.set_postfix(**({"reward": f"{m['reward']:.3f}"} if "reward" in m else {}),
                        score=f"{m[f'{kind}/score']:.3f}",
                        kl=f"{m['kl']:.3f}", vloss=f"{m['value_loss']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint.save_checkpoint(ckpt, tok, state, trained)  # a collective: rank 0 writes

    # final evaluation and outputs
    summary = {"train/steps": state["step"], "train/seconds": time.time() - t_start,
               "reward": cfg.reward, "critic_init": cfg.critic_init, f"{kind}/scale": scale,
               **evaluation.eval_summary(state["before"], evaluate())}
    if "reward_corr" in state:
        summary[f"{kind}/reward_corr_final"] = state["reward_corr"]
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
