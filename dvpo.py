"""dvpo.py — Decoupled Value Policy Optimization: clipped PPO whose per-token advantages come from
a frozen, pretrained Global Value Model. No reward model, no critic, no value loss.
Equation numbers are those of arXiv:2502.16944v1 (§3.3); the math is docs/algorithm.md §3-§5.

Per step:
  1. Rollout: y ~ π_θ(·|x) with a KV cache (left-padded prompts, cut at the first EOS).
  2. Frozen forwards, once per rollout batch: old log-probs (π_θ), reference log-probs (π_ref), GVM
     value chain w_0..w_T on [τ] ⊕ x ⊕ y (τ: K rollouts of the previous step, other prompts).
  3. KL penalty as a per-token reward: r^KL_t = -β (log π_θ(y_t) - log π_ref(y_t)).
  4. Advantages, one of:
       td    : V_t = w_{t-1}, r_t = r^KL_t + [t = T] w_T, GAE(γ, λ), whitened over the global batch
       paper : A_t = BN(Q)_t + Σ_{k≥t} γ^{k-t} r^KL_k with Q_t = w_t                       (Eq. 2)
     where BN is masked batch normalization over the global batch.
  5. E epochs × minibatches of the clipped objective                                        (Eq. 3)
       L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),  ρ_t = π_θ(y_t) / π_old(y_t)
  What DVPO removes from ppo_baseline.py: the reward-model forward and the critic (its forward,
  value loss, backward and optimizer). `diff dvpo.py ppo_baseline.py` shows exactly that.

Launch:
  python dvpo.py                                 # built-in task: out/sft + out/gvm -> out/dvpo
  python dvpo.py --model <hub id or path> --gvm out/gvm --prompts prompts.jsonl
  torchrun --nproc_per_node 8 dvpo.py --model <path> --gvm <path> --prompts prompts.jsonl
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import fsdp_utils as fu
import train_utils as tu

BATCH_KEYS = ("input_ids", "attention_mask", "prompt_len", "response_len")  # what a training forward reads


@dataclass
class Config:
    model: str = "out/sft"  # initial policy (and frozen reference): hub id or path
    gvm: str = "out/gvm"  # frozen Global Value Model folder (gvm.py)
    prompts: str = ""  # prompts JSONL/JSON ({prompt} or {messages}); empty = built-in task
    out_dir: str = "out/dvpo"
    steps: int = 40  # rollout batches (PPO iterations)
    batch_size: int = 64  # prompts per rollout, global
    minibatch_size: int = 32  # sequences per optimizer step, global
    micro_batch_size: int = 32  # sequences per forward/backward on one rank (gradient accumulation)
    ppo_epochs: int = 4
    lr: float = 2e-4  # use ~1e-6 for real models (paper App. A: 2e-6)
    warmup_steps: int = 10  # optimizer steps
    grad_clip: float = 1.0
    clip_eps: float = 0.2  # PPO clip ε
    kl_beta: float = 0.1  # KL penalty β on unit-scale rewards, DVPO's best on the frontier (docs/results.md)
    normalize_reward: bool = True  # divide the GVM chain by the GVM's held-out std of w_T (docs/algorithm.md §7)
    kl_target: float = 0.0  # > 0: adaptive β (Ziegler et al. 2019) steering the KL to this value
    kl_horizon: int = 10000
    advantage: str = "td"  # td (GAE on the GVM chain) or paper (BN(Q) + KL-to-go, Eq. 2)
    gamma: float = 1.0
    lam: float = 0.95  # GAE λ for --advantage td
    tau_k: int = -1  # τ trajectories in the GVM context; -1 = as the GVM was trained
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16  # use 512-1024 for real models
    max_prompt_len: int = 512
    gradient_checkpointing: bool = False
    frozen_dtype: str = "auto"  # reference and GVM: auto = bfloat16 on CUDA, float32 on CPU; or float32 / bfloat16
    eval_prompts: int = 1024  # held-out prompts for the before/after evaluation (0 = none)
    eval_reward: str = ""  # module:function f(prompt, response) -> float; empty = built-in gold reward
    save_every: int = 20  # steps between checkpoints (0 = only at the end); docs/checkpoints.md
    resume: str = "no"  # no: start fresh, refused over a checkpoint | auto: resume if there is one | yes: must resume
    overwrite: bool = False  # start fresh although out_dir holds a checkpoint (deletes it and metrics.jsonl)
    log_every: int = 1
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------------------------
# Pure functions: normalization, advantages, PPO loss (docs/algorithm.md §3-§5)

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_batch_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - μ) / (σ + ε) with the population μ, σ of the entries where mask == 1 across the GLOBAL
    batch (Σx, Σx², n all-reduced over ranks); zeros where mask == 0, and everywhere if n ≤ 1.
    x, mask: (B, T). Eq. (2); docs/algorithm.md §3."""
    xd, md = x.double(), mask.double()  # fp64 before summing: Σx² - nμ² cancels badly in fp32 (§3)
    stats = torch.stack([(xd * md).sum(), (xd * xd * md).sum(), md.sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # statistics of the global batch
    s, s2, n = stats.tolist()
    if n <= 1:
        return torch.zeros_like(x)
    mu = s / n
    sigma = math.sqrt(max(s2 / n - mu * mu, 0.0))
    return ((x.double() - mu) / (sigma + eps) * md).to(x.dtype)


def discounted_cumsum(r: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Σ_{k≥t} γ^{k-t} r_k over valid entries, (B, T) -> (B, T)."""
    out, run = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        run = (r[:, t] + gamma * run) * mask[:, t]
        out[:, t] = run
    return out


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalized advantage estimation (Schulman et al. 2016), right-aligned rows.
    values V_t, rewards r_t, mask: (B, T); V_{T_b+1} = 0 after each row's last valid token.
        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1}"""
    A, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        m_next = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * values[:, t + 1 if t + 1 < T else t] * m_next - values[:, t]
        last = (delta + gamma * lam * m_next * last) * mask[:, t]
        A[:, t] = last
    return A


def terminal(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last valid entry of each row: (B, T) -> (B,)."""
    return x.gather(1, (mask.sum(1).long() - 1).clamp(min=0)[:, None]).squeeze(1)


def td_advantages(w: torch.Tensor, r_kl: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE with the frozen GVM as both critic and terminal reward (docs/algorithm.md §4, `td`):
    V_t = w_{t-1}, r_t = r^KL_t + [t = T] w_T.  w: (B, T+1) chain, r_kl and mask: (B, T).
    Returns A (B, T) before whitening. With λ = 1, β = 0: Σ_t δ_t = w_T - w_0."""
    T = mask.shape[1]
    w_T = terminal(w[:, 1:], mask)  # Q(s_T, a_T) ≈ r(x, y)
    is_last = torch.zeros_like(mask).scatter(1, (mask.sum(1).long() - 1).clamp(min=0)[:, None], 1.0) * mask
    return gae(w[:, :T], r_kl + is_last * w_T[:, None], mask, gamma, lam)


def paper_advantages(w: torch.Tensor, r_kl: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. (2), docs/algorithm.md §4 `paper`: A_t = BN(Q)_t + Σ_{k≥t} γ^{k-t} r^KL_k, with Q_t = w_t
    (post-token values). w: (B, T+1) chain, r_kl and mask: (B, T)."""
    return masked_batch_norm(w[:, 1:], mask) + discounted_cumsum(r_kl, mask, gamma)


def ppo_clip_loss(logp, old_logp, adv, mask, clip_eps: float, n_tokens: float):
    """Clipped surrogate (Eq. (3); docs/algorithm.md §5). All (B, T); n_tokens = valid tokens of the global
    minibatch, so the loss is a global token mean. Returns (loss, stats)."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = (torch.max(pg_loss1, pg_loss2) * mask).sum() / n_tokens
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item(),
                 "approx_kl": masked_mean(0.5 * logratio ** 2, mask).item()}
    return loss, stats


def kl_controller(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Adaptive KL coefficient (Ziegler et al. 2019): β ← β (1 + clip(KL/target - 1, ±0.2) n/H)."""
    return beta * (1 + max(min(kl / target - 1, 0.2), -0.2) * n_steps / horizon)


# ----------------------------------------------------------------------------------------------
# The step: score a rollout with the frozen models, then update the policy

@torch.inference_mode()
def gvm_values(gvm, batch: dict, tau: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """GVM value chain (B, T+1) on [τ_b] ⊕ x_b ⊕ y_b, computed once per rollout batch."""
    prompts = [t + p for t, p in zip(tau, batch["prompt_ids"])]
    g = {k: v.to(device) for k, v in data.collate_right(prompts, tu.responses(batch), pad_id).items()}
    w, _ = data.value_chain(gvm(g["input_ids"], g["attention_mask"]).float(), g["prompt_len"], g["response_len"])
    fu.reshard(gvm)
    return w.clone()


def draw_tau_from_pool(pool: list, prompt_ids: list[list[int]], K: int, gcfg: dict,
                       rng: random.Random) -> list[list[int]]:
    """τ for each prompt: K (prompt, response) pairs of the current policy from the previous step
    (or this step at step 0, when the policy is still the SFT policy), with a different prompt."""
    if K == 0:
        return [[] for _ in prompt_ids]
    out = []
    for p in prompt_ids:
        cands = [c for c in pool if c[0] != p]
        picks = rng.sample(cands, K) if len(cands) >= K else [rng.choice(pool) for _ in range(K)]
        out.append(data.tau_prefix(picks, gcfg["tau_prompt_len"], gcfg["tau_response_len"]))
    return out


def score(policy, ref, gvm, batch: dict, tau: list, beta: float, scale: float, cfg: Config, pad_id: int,
          device) -> dict:
    """Steps 2-4: the frozen forwards, once per rollout batch (reused by every PPO epoch), the KL
    penalty and the advantages. `scale`: the GVM's held-out std of w_T (1 = raw values). Returns
    mask, old_logp, kl, adv (B, T) and the GVM chain w (B, T+1), divided by scale."""
    T = batch["response"].shape[1]
    mask = data.response_mask(batch["response_len"], T)  # (B, T)
    old_logp = tu.frozen_logprobs(policy, batch, T, cfg.temperature)
    ref_logp = tu.frozen_logprobs(ref, batch, T, cfg.temperature)
    w = gvm_values(gvm, batch, tau, pad_id, device) / scale  # (B, T+1), w_T on a unit scale (§7)
    kl = (old_logp - ref_logp) * mask  # k1 estimator
    r_kl = -beta * kl
    if cfg.advantage == "td":
        adv = masked_batch_norm(td_advantages(w, r_kl, mask, cfg.gamma, cfg.lam), mask)
    else:
        adv = paper_advantages(w, r_kl, mask, cfg.gamma)  # Eq. (2)
    return {"mask": mask, "old_logp": old_logp, "kl": kl, "w": w, "adv": adv}


def update(policy, opt, batch: dict, sc: dict, cfg: Config, step: int, opt_step: int) -> tuple[dict, int]:
    """Step 5: E epochs × minibatches × micro-batches (gradient accumulation) of the clipped loss;
    no value loss. Returns the step's mean stats and the new optimizer-step count."""
    world = fu.world()
    per_rank, mb_rank = cfg.batch_size // world, cfg.minibatch_size // world
    micro, mask, T = min(cfg.micro_batch_size, mb_rank), sc["mask"], sc["mask"].shape[1]
    total = cfg.steps * cfg.ppo_epochs * (per_rank // mb_rank)  # optimizer steps of the run (LR schedule)
    stats = {"clipfrac": [], "approx_kl": [], "entropy": [], "grad_norm": []}
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(per_rank, generator=tu.torch_rng(cfg.seed, "minibatch", step, epoch))
        for mb in range(0, per_rank, mb_rank):
            mb_idx = perm[mb:mb + mb_rank]
            n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone()).item()  # global minibatch tokens
            for g in opt.param_groups:
                g["lr"] = tu.lr_at(opt_step, total, cfg.warmup_steps, cfg.lr)
            opt.zero_grad(set_to_none=True)
            for mi in range(0, mb_rank, micro):
                fu.grad_sync(policy, mi + micro >= mb_rank)  # FSDP: reduce-scatter after the last micro-batch only
                i = mb_idx[mi:mi + micro].to(mask.device)
                sub = {k: batch[k][i] for k in BATCH_KEYS}
                logp, entropy = data.response_logprobs(policy, sub, T, cfg.temperature)
                loss, s = ppo_clip_loss(logp, sc["old_logp"][i], sc["adv"][i], mask[i], cfg.clip_eps, n_tokens)
                (loss * world).backward()  # FSDP averages gradients over ranks: undo it
                stats["clipfrac"].append(s["clipfrac"])
                stats["approx_kl"].append(s["approx_kl"])
                stats["entropy"].append(masked_mean(entropy.detach(), mask[i]).item())
            stats["grad_norm"].append(fu.grad_norm_clip(policy, cfg.grad_clip))
            tu.check_finite(stats["grad_norm"][-1], "gradient norm (policy loss)", step + 1)  # all-reduced
            opt.step()
            opt_step += 1
    opt.zero_grad(set_to_none=True)  # no gradients held through the next rollout and frozen forwards
    return {k: sum(v) / len(v) for k, v in stats.items()}, opt_step


# ----------------------------------------------------------------------------------------------
# main: the recipe

def main(cfg: Config):
    device = fu.setup(cfg.device)
    for path, cmd in ((cfg.model, "python sft.py"), (cfg.gvm, "python gvm.py")):
        if path.startswith("out/") and not os.path.exists(path):
            sys.exit(f"dvpo.py: {path} is missing; run `{cmd}` first")
    if cfg.advantage not in ("td", "paper"):
        sys.exit(f"dvpo.py: --advantage must be 'td' or 'paper', got {cfg.advantage!r}")
    tu.check_batch_sizes(cfg, fu.world(), "dvpo.py")
    tu.seed_everything(cfg.seed)
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    resume = checkpoint.resume_or_fresh(ckpt, cfg.resume, cfg.overwrite, "dvpo.py")  # recovers the newest complete one
    metrics_path = tu.start_metrics(cfg.out_dir, cfg, keep=resume)

    # models: trained policy (fp32 master), frozen reference (the initial policy) and GVM in frozen_dtype;
    # all sharded alike under torchrun, each rank loading only its shards
    frozen_dtype = tu.frozen_dtype(cfg.frozen_dtype, device)
    policy, tok = tu.load_policy(ckpt if resume else cfg.model, device)
    ref, _ = tu.load_policy(cfg.model, device, dtype=frozen_dtype, frozen=True)
    gvm, _, gcfg = tu.load_value_model(cfg.gvm, "gvm_config.json", "train a GVM with `python gvm.py`", device,
                                       dtype=frozen_dtype, frozen=True)
    tau_k = gcfg.get("tau_k", 0) if cfg.tau_k < 0 else cfg.tau_k
    scale = tu.value_scale(gcfg, cfg.normalize_reward, cfg.gvm)  # in `paper` mode BN(w / s) = BN(w): no change
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)

    # prompts: each rank reads its own shard
    my_texts, my_prompts, eval_prompts, builtin = tu.load_prompts(cfg, tok, data.TruncationStats())
    reward_fn = tu.load_reward_fn(cfg.eval_reward, builtin)

    def evaluate():  # held-out reward and KL to the reference, before and after training
        return tu.evaluate_policy(policy, ref, tok, eval_prompts, device, cfg.seed, cfg.max_new_tokens, reward_fn,
                                  cfg.temperature, cfg.top_p, cfg.max_prompt_len)
    fu.print0(f"tau_k={tau_k}")
    data.check_context(max(map(len, my_prompts)) + cfg.max_new_tokens, policy.config, "prompt + max_new_tokens")

    state = {"step": 0, "kl_beta": cfg.kl_beta, "tau_pool": [], "opt_step": 0, "before": None}
    if resume:
        checkpoint.load_checkpoint(ckpt, state, {"policy": (policy, opt)})
        checkpoint.trim_metrics(metrics_path, state["step"])
        fu.print0(f"resumed from {ckpt} at step {state['step']}")
    if state["before"] is None:
        state["before"] = evaluate()
    fu.print0("before: " + (" | ".join(f"{k} {v:.4f}" for k, v in state["before"].items()) or "no held-out prompts"))

    per_rank = cfg.batch_size // fu.world()
    t_start = time.time()
    bar = tqdm(range(state["step"], cfg.steps), desc="dvpo", disable=fu.rank() != 0,
               initial=state["step"], total=cfg.steps)
    for step in bar:
        t0 = time.time()
        gen = tu.torch_rng(cfg.seed, "rollout", step, fu.rank(), device=device)  # every draw: (seed, step, rank)
        rng = tu.python_rng(cfg.seed, "tau", step, fu.rank())
        idx = [(step * per_rank + i) % len(my_prompts) for i in range(per_rank)]

        # 1. rollout
        batch = tu.rollout(policy, [my_prompts[i] for i in idx], tok, cfg.max_new_tokens, cfg.temperature,
                           cfg.top_p, gen, device)
        t_gen = time.time() - t0

        # 2-4. frozen forwards (GVM on [τ] ⊕ x ⊕ y, τ from the previous step), KL penalty, advantages
        pool = state["tau_pool"] or list(zip(batch["prompt_ids"], tu.responses(batch)))
        tau = draw_tau_from_pool(pool, batch["prompt_ids"], tau_k, gcfg, rng)
        sc = score(policy, ref, gvm, batch, tau, state["kl_beta"], scale, cfg, tok.pad_token_id, device)
        tu.check_finite(sc["adv"], "advantage", step + 1)  # from global batch statistics: every rank agrees
        t_score = time.time() - t0 - t_gen

        # 5. PPO epochs × minibatches × micro-batches; no value loss
        stats, state["opt_step"] = update(policy, opt, batch, sc, cfg, step, state["opt_step"])

        # 6. bookkeeping: KL controller, τ pool for the next step, logs, checkpoint
        mask, w = sc["mask"], sc["w"]
        seq_kl = sc["kl"].sum(1).mean().item()
        if cfg.kl_target > 0:
            state["kl_beta"] = kl_controller(state["kl_beta"], fu.reduce_metrics({"kl": seq_kl}, device)["kl"],
                                             cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
        state["tau_pool"] = list(zip(batch["prompt_ids"], tu.responses(batch)))
        state["step"] = step + 1
        dt = time.time() - t0
        w_T = terminal(w[:, 1:], mask)  # (B,) the GVM's estimate of each response's reward
        m = {"gvm/return": w_T.mean().item(), "gvm/value_prompt": w[:, 0].mean().item(),
             "kl": seq_kl, "response_len": batch["response_len"].float().mean().item(),
             "truncated": batch["truncated"].float().mean().item(), **stats}
        if reward_fn is not None:  # reporting only, never in a loss
            r = tu.rewards(reward_fn, [my_texts[i] for i in idx], batch["response"], tok)
            m["reward"] = sum(r) / len(r)  # value drift: does the frozen GVM still rank this policy's samples?
            corr = tu.rank_correlation(w_T, torch.tensor(r))
            m["gvm/reward_corr"] = corr  # nan when every reward of the batch is equal: left out of the mean
        tokens = fu.all_reduce_sum(mask.sum().detach().clone()).item()
        m = tu.step_row(m, device, **{"step": step + 1, "kl_beta": state["kl_beta"], "lr": opt.param_groups[0]["lr"],
                                      "time/step_s": dt, "time/generate_s": t_gen, "time/score_s": t_score,
                                      "tokens_per_s": float(tokens) / dt})
        if "gvm/reward_corr" in m:  # value drift: the last step's value goes to summary.json
            state["reward_corr"] = m["gvm/reward_corr"]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            fu.append_jsonl(metrics_path, m)
        bar.set_postfix(**({"reward": f"{m['reward']:.3f}"} if "reward" in m else {}), ret=f"{m['gvm/return']:.3f}",
                        kl=f"{m['kl']:.3f}", clip=f"{m['clipfrac']:.2f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint.save_checkpoint(ckpt, tok, state, {"policy": (policy, opt)})

    # final evaluation and outputs
    summary = {"train/steps": state["step"], "train/seconds": time.time() - t_start, "advantage": cfg.advantage,
               "tau_k": tau_k, "gvm/scale": scale, **tu.eval_summary(state["before"], evaluate())}
    if "reward_corr" in state:
        summary["gvm/reward_corr_final"] = state["reward_corr"]
    checkpoint.save_checkpoint(ckpt, tok, state, {"policy": (policy, opt)})
    checkpoint.save_hf(policy, tok, cfg.out_dir)
    tu.finish(cfg.out_dir, summary)
    fu.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main(fu.parse_config(Config))
    except (data.DataError, tu.NonFiniteError) as e:  # bad input or a NaN: one clear line, no traceback
        sys.exit(f"dvpo.py: {e}")
