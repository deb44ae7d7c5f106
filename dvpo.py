"""dvpo.py — Decoupled Value Policy Optimization: clipped PPO whose per-token advantages come from
a frozen, pretrained Global Value Model. No reward model, no critic, no value loss.
Equation numbers are those of arXiv:2502.16944v1 (§3.3); the math is docs/algorithm.md §3-§5.

Per step:
  1. Rollout: y ~ π_θ(·|x) with a KV cache (left-padded prompts, cut at the first EOS); one response
     per prompt.
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
  Positions (which entry of which tensor is read where): model.py's docstring, docs/algorithm.md §1.

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
import evaluation
import fsdp_utils as fu
import model
import train_utils as tu

GVM_CONFIG = "gvm_config.json"  # the frozen value model's config: γ, λ, τ settings, value scale (gvm.py)


@dataclass
class Config:
    model: str = "out/sft"  # initial policy (and frozen reference): hub id or path
    gvm: str = "out/gvm"  # frozen Global Value Model folder (gvm.py)
    prompts: str = ""  # prompts JSONL/JSON ({prompt} or {messages}); empty = built-in task
    out_dir: str = "out/dvpo"
    steps: int = 40  # rollout batches (PPO iterations)
    batch_size: int = 64  # responses per rollout, global
    minibatch_size: int = 32  # sequences per optimizer step, global
    micro_batch_size: int = 32  # sequences per forward on one rank: training (gradient accumulation) and scoring
    grad_sync: str = "every"  # every: reduce-scatter each micro-batch's gradients | last: once per step (faster,
    #                            but an unsharded fp32 gradient of the trained model on every rank meanwhile)
    ppo_epochs: int = 4
    lr: float = 2e-4  # use ~1e-6 for real models (paper App. A: 2e-6)
    warmup_steps: int = 10  # optimizer steps
    grad_clip: float = 1.0
    clip_eps: float = 0.2  # PPO clip ε
    kl_beta: float = 0.1  # KL penalty β on unit-scale rewards: the frontier's best for both (docs/results.md)
    normalize_reward: bool = True  # divide the reward by its value model's held-out std (docs/algorithm.md §7)
    kl_target: float = 0.0  # > 0: adaptive β (Ziegler et al. 2019) steering the KL to this value
    kl_horizon: int = 10000
    advantage: str = "td"  # td (GAE on the GVM chain) or paper (BN(Q) + KL-to-go, Eq. 2)
    gamma: float = 1.0
    lam: float = 0.95  # GAE λ
    tau_k: int = -1  # τ trajectories in the GVM context; -1 = as the GVM was trained
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
# Pure functions: normalization, advantages, PPO loss (docs/algorithm.md §3-§5)

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the entries where mask == 1, x and mask: (B, T) -> 0-d tensor (0 if none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_batch_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - μ) / (σ + ε) with the population μ, σ of the entries where mask == 1 across the GLOBAL
    batch (Σx, Σx², n all-reduced over ranks); zeros where mask == 0, and everywhere if n ≤ 1.
    x, mask: (B, T). Eq. (2); docs/algorithm.md §3."""
    xd, md = x.double(), mask.double()  # fp64 before summing: Σx² - nμ² cancels badly in fp32 (§3)
    stats = torch.stack([(xd * md).sum(), (xd * xd * md).sum(), md.sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # all-reduce: statistics of the global batch
    s, s2, n = stats.tolist()  # CPU-GPU sync
    if n <= 1:
        return torch.zeros_like(x)
    mu = s / n
    sigma = math.sqrt(max(s2 / n - mu * mu, 0.0))
    return ((x.double() - mu) / (sigma + eps) * md).to(x.dtype)


def discounted_cumsum(r: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Σ_{k≥t} γ^{k-t} r_k over valid entries, r and mask: (B, T) -> (B, T)."""
    out, run = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        run = (r[:, t] + gamma * run) * mask[:, t]
        out[:, t] = run
    return out


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalized advantage estimation (Schulman et al. 2016) on left-aligned rows (row b valid on
    t < T_b, padding after). values V_t, rewards r_t, mask: (B, T); V_{T_b+1} = 0 after each row's last token.
        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1}"""
    A, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        m_next = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * values[:, t + 1 if t + 1 < T else t] * m_next - values[:, t]
        last = (delta + gamma * lam * m_next * last) * mask[:, t]
        A[:, t] = last
    return A


def gae_with_terminal_reward(values: torch.Tensor, score: torch.Tensor, r_kl: torch.Tensor, mask: torch.Tensor,
                             gamma: float, lam: float) -> torch.Tensor:
    """GAE whose only reward besides the KL penalty is a terminal score: r_t = r^KL_t + [t = T_b] score_b.
    values V_t, r_kl, mask: (B, T); score: (B,). Returns A (B, T) before whitening.
    DVPO `td` (docs/algorithm.md §4): V_t = w_{t-1} and score = w_T, one frozen GVM for both;
    PPO (§6): the critic's V_t and the reward model's score. With λ = γ = 1, β = 0 on the GVM chain
    the deltas telescope: Σ_t δ_t = w_T - w_0."""
    is_last = torch.zeros_like(mask).scatter(1, model.last_index(mask)[:, None], 1.0) * mask
    return gae(values, r_kl + is_last * score[:, None], mask, gamma, lam)


def paper_advantages(w: torch.Tensor, r_kl: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. (2), docs/algorithm.md §4 `paper`: A_t = BN(Q)_t + Σ_{k≥t} γ^{k-t} r^KL_k, with Q_t = w_t
    (post-token values). w: (B, T+1) chain, r_kl and mask: (B, T)."""
    return masked_batch_norm(w[:, 1:], mask) + discounted_cumsum(r_kl, mask, gamma)


def ppo_clip_loss(logp, old_logp, adv, mask, clip_eps: float, n_tokens) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate, Eq. (3) (docs/algorithm.md §5). logp, old_logp, adv, mask: (B, T).
    Loss convention: this rank's share of the global token mean, Σ_local / n_tokens with n_tokens the
    valid tokens of the global minibatch (the caller backpropagates loss * world: DDP/FSDP average
    gradients over ranks). stats: clipfrac and approx_kl over this rank's tokens, detached 0-d tensors."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = (torch.max(pg_loss1, pg_loss2) * mask).sum() / n_tokens
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask),
                 "approx_kl": masked_mean(0.5 * logratio ** 2, mask)}
    return loss, stats


def kl_controller(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Adaptive KL coefficient (Ziegler et al. 2019), on scalars: β ← β (1 + clip(KL/target - 1, ±0.2) n/H)."""
    return beta * (1 + max(min(kl / target - 1, 0.2), -0.2) * n_steps / horizon)


# ----------------------------------------------------------------------------------------------
# The step: score a rollout with the frozen models, then update the policy

@torch.no_grad()  # not inference_mode: FSDP2's parameter buffers must stay ordinary tensors
def gvm_values(gvm, batch: dict, tau: list[list[int]], pad_id: int, device, micro_batch_size: int) -> torch.Tensor:
    """GVM value chain (B, T+1) on [τ_b] ⊕ x_b ⊕ y_b, computed once per rollout batch, in micro-batches."""
    prompts = [t + p for t, p in zip(tau, batch["prompt_ids"])]
    responses = model.responses(batch)
    T = batch["response"].shape[1]
    chains = []
    for i in range(0, len(prompts), micro_batch_size):
        g = data.collate_right(prompts[i:i + micro_batch_size], responses[i:i + micro_batch_size], pad_id)
        g = {k: v.to(device) for k, v in g.items()}
        u = gvm(g["input_ids"], g["attention_mask"])  # (b, L), fp32
        chains.append(model.value_chain(u, g["prompt_len"], g["response_len"], T)[0])  # (b, T+1)
    fu.reshard(gvm)  # FSDP2 keeps the root gathered after forward: free it
    return torch.cat(chains)


def draw_tau_from_pool(pool: list, prompt_ids: list[list[int]], n_tau: int, gcfg: dict,
                       rng: random.Random) -> list[list[int]]:
    """τ for each prompt: n_tau (prompt, response) pairs of the current policy from the previous step
    (or this step at step 0, when the policy is still the SFT policy), with a different prompt (drawn with
    replacement when fewer than n_tau differ; the row's own prompt only when the pool holds no other)."""
    if n_tau == 0:
        return [[] for _ in prompt_ids]
    out = []
    for p in prompt_ids:
        cands = [c for c in pool if c[0] != p]
        picks = rng.sample(cands, n_tau) if len(cands) >= n_tau else [rng.choice(cands or pool) for _ in range(n_tau)]
        out.append(data.tau_prefix(picks, gcfg["tau_prompt_len"], gcfg["tau_response_len"]))
    return out


def score(policy, ref, gvm, batch: dict, tau: list, beta: float, scale: float, cfg: Config, pad_id: int,
          device) -> dict:
    """Steps 2-4: the frozen forwards, once per rollout batch (reused by every PPO epoch), the KL
    penalty and the advantages. `scale`: the GVM's held-out std of w_T (1 = raw values). Returns
    mask, old_logp, kl, adv (B, T) and the GVM chain w (B, T+1), divided by scale."""
    T = batch["response"].shape[1]
    mask = data.response_mask(batch["response_len"], T)  # (B, T)
    old_logp = model.frozen_logprobs(policy, batch, T, cfg.temperature, cfg.micro_batch_size)
    ref_logp = model.frozen_logprobs(ref, batch, T, cfg.temperature, cfg.micro_batch_size)
    w = gvm_values(gvm, batch, tau, pad_id, device, cfg.micro_batch_size) / scale  # DVPO only: (B, T+1), unit scale
    kl = (old_logp - ref_logp) * mask  # k1 estimator
    r_kl = -beta * kl
    if cfg.advantage == "td":  # V_t = w_{t-1}, terminal score w_T ≈ r(x, y)
        adv_raw = gae_with_terminal_reward(w[:, :-1], model.terminal(w[:, 1:], mask), r_kl, mask, cfg.gamma,
                                           cfg.lam)
        adv = masked_batch_norm(adv_raw, mask)
    else:
        adv = paper_advantages(w, r_kl, mask, cfg.gamma)  # Eq. (2)
    return {"mask": mask, "old_logp": old_logp, "kl": kl, "w": w, "adv": adv}


def update(policy, opt, batch: dict, sc: dict, cfg: Config, step: int, opt_step: int) -> tuple[dict, int]:
    """Step 5: E epochs × minibatches × micro-batches (gradient accumulation) of the clipped loss;
    no value loss. Returns the step's statistics (lists of detached 0-d tensors: no host sync
    until they are logged) and the new optimizer-step count."""
    world = fu.world()
    per_rank = cfg.batch_size // world
    mb_rank = cfg.minibatch_size // world
    micro = min(cfg.micro_batch_size, mb_rank)
    mask = sc["mask"]
    T = mask.shape[1]
    total = cfg.steps * cfg.ppo_epochs * (per_rank // mb_rank)  # optimizer steps of the run (LR schedule)
    stats = {"policy_loss": [], "clipfrac": [], "approx_kl": [], "entropy": [], "grad_norm": []}
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(per_rank, generator=tu.torch_rng(cfg.seed, "minibatch", step, epoch))
        for mb in range(0, per_rank, mb_rank):
            mb_idx = perm[mb:mb + mb_rank]
            n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone())  # all-reduce: global minibatch tokens
            for g in opt.param_groups:
                g["lr"] = tu.lr_at(opt_step, total, cfg.warmup_steps, cfg.lr)
            opt.zero_grad(set_to_none=True)
            mb_loss = torch.zeros((), device=mask.device)  # Σ over micro-batches of this rank's loss shares
            for mi in range(0, mb_rank, micro):
                fu.grad_sync(policy, cfg.grad_sync == "every" or mi + micro >= mb_rank)  # FSDP2 reduce-scatter
                i = mb_idx[mi:mi + micro].to(mask.device)
                sub = {k: batch[k][i] for k in model.BATCH_KEYS}
                logp, entropy = model.response_logprobs(policy, sub, T, cfg.temperature, with_entropy=True)
                loss, s = ppo_clip_loss(logp, sc["old_logp"][i], sc["adv"][i], mask[i], cfg.clip_eps, n_tokens)
                (loss * world).backward()  # DDP/FSDP average gradients over ranks: undo it
                mb_loss += loss.detach()
                stats["clipfrac"].append(s["clipfrac"])
                stats["approx_kl"].append(s["approx_kl"])
                stats["entropy"].append(masked_mean(entropy.detach(), mask[i]))
            stats["policy_loss"].append(mb_loss * world)  # its mean over ranks is the global minibatch loss
            stats["grad_norm"].append(fu.grad_norm_clip(policy, cfg.grad_clip))  # all-reduce under FSDP2
            opt.step()
            opt_step += 1
    opt.zero_grad(set_to_none=True)  # no gradients held through the next rollout and frozen forwards
    # the norms are all-reduced, so every rank agrees (and stops together); CPU-GPU sync
    tu.check_finite(torch.stack(stats["grad_norm"]), "gradient norm (policy loss)", step + 1)
    return stats, opt_step


# ----------------------------------------------------------------------------------------------
# main: the recipe

def main(cfg: Config):
    device = fu.setup(cfg.device, cfg.dist_timeout_min)
    for path, cmd in ((cfg.model, "python sft.py"), (cfg.gvm, "python gvm.py")):
        if path.startswith("out/") and not os.path.exists(path):
            sys.exit(f"dvpo.py: {path} is missing; run `{cmd}` first")
    if cfg.advantage not in ("td", "paper"):
        raise tu.ConfigError(f"--advantage must be 'td' or 'paper', got {cfg.advantage!r}")
    tu.check_choice("grad_sync", cfg.grad_sync, ("every", "last"))
    tu.check_batch_sizes(cfg.batch_size, cfg.minibatch_size, cfg.micro_batch_size, fu.world())
    tu.seed_everything(cfg.seed)
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    resume = checkpoint.resume_or_fresh(ckpt, cfg.resume, cfg.overwrite, "dvpo.py")  # recovers the newest complete one
    metrics_path = tu.start_metrics(cfg.out_dir, vars(cfg), keep=resume)

    # models: the trained policy (fp32 master weights) and the frozen ones in frozen_dtype, each rank
    # loading only its shards (FSDP2 under torchrun: fully_shard per block, then root)
    frozen_dtype = model.frozen_dtype(cfg.frozen_dtype, device)
    policy, tok = model.load_policy(cfg.model, device)  # on resume, load_checkpoint overwrites its weights
    ref, _ = model.load_policy(cfg.model, device, dtype=frozen_dtype, frozen=True)
    gvm, _, gcfg = model.load_value_model(cfg.gvm, GVM_CONFIG, "train a GVM with `python gvm.py`", device,
                                          dtype=frozen_dtype, frozen=True)  # DVPO only: the frozen GVM
    tau_k = gcfg.get("tau_k", 0) if cfg.tau_k < 0 else cfg.tau_k
    scale = model.value_scale(gcfg, cfg.normalize_reward, cfg.gvm)  # in `paper` mode BN(w / s) = BN(w): no change
    if warning := model.chance_warning(gcfg, cfg.gvm):  # a value model at chance: say so before RL
        fu.print0(warning)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(policy)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)

    # prompts: each rank keeps its own shard
    my_texts, my_prompts, eval_prompts, builtin = evaluation.load_prompts(
        cfg.prompts, tok, cfg.steps * cfg.batch_size, cfg.eval_prompts, cfg.max_prompt_len, cfg.seed,
        data.TruncationStats())
    reward_fn = evaluation.load_reward_fn(cfg.eval_reward, builtin)

    def evaluate():  # held-out reward and KL to the reference, before and after training
        return evaluation.evaluate_policy(policy, ref, tok, eval_prompts, device, cfg.seed, cfg.max_new_tokens,
                                          reward_fn, cfg.temperature, cfg.top_p, cfg.max_prompt_len,
                                          cfg.eval_batch_size, cfg.micro_batch_size)

    fu.print0(f"tau_k={tau_k}")
    data.check_context(max(map(len, my_prompts)) + cfg.max_new_tokens, policy.config, "prompt + max_new_tokens")

    state = {"step": 0, "kl_beta": cfg.kl_beta, "tau_pool": [], "opt_step": 0, "before": None}
    trained = {"policy": (policy, opt)}
    if resume:
        checkpoint.load_checkpoint(ckpt, state, trained)
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
        batch = model.rollout(policy, [my_prompts[i] for i in idx], tok, cfg.max_new_tokens, cfg.temperature,
                              cfg.top_p, gen, device)
        t_gen = time.time() - t0

        # 2-4. frozen forwards (DVPO only: the GVM on [τ] ⊕ x ⊕ y, τ of the previous step), KL penalty, advantages
        pool = state["tau_pool"] or list(zip(batch["prompt_ids"], model.responses(batch)))
        tau = draw_tau_from_pool(pool, batch["prompt_ids"], tau_k, gcfg, rng)
        sc = score(policy, ref, gvm, batch, tau, state["kl_beta"], scale, cfg, tok.pad_token_id, device)
        tu.check_finite(sc["adv"], "advantage", step + 1)  # from global batch statistics: every rank agrees
        t_score = time.time() - t0 - t_gen

        # 5. PPO epochs × minibatches × micro-batches; no value loss
        stats, state["opt_step"] = update(policy, opt, batch, sc, cfg, step, state["opt_step"])

        # 6. bookkeeping: logs, KL controller, τ pool for the next step, checkpoint
        mask = sc["mask"]
        dt = time.time() - t0
        w_T = model.terminal(sc["w"][:, 1:], mask)  # (B,) the GVM's estimate of each response's reward
        m = {"gvm/return": w_T.mean(), "gvm/value_prompt": sc["w"][:, 0].mean(), "kl": sc["kl"].sum(1).mean(),
             "response_len": batch["response_len"].float().mean(), "truncated": batch["truncated"].float().mean(),
             "tokens_per_s": mask.sum() * fu.world() / dt, **tu.mean_of(stats)}  # mean_of: CPU-GPU sync
        if reward_fn is not None:  # reporting only, never in a loss
            stops = data.stop_token_ids(tok, policy.generation_config)  # the rollout's stop tokens
            r = evaluation.rewards(reward_fn, [my_texts[i] for i in idx], batch["response"], tok, stops)
            m["reward"] = sum(r) / len(r)  # value drift: does the frozen GVM still rank this policy's samples?
            corr = evaluation.rank_correlation(w_T, torch.tensor(r))
            m["gvm/reward_corr"] = corr  # nan when every reward of the batch is equal: left out of the mean
        m = tu.step_row(m, device, step=step + 1, lr=opt.param_groups[0]["lr"], **{
            "time/step_s": dt, "time/generate_s": t_gen, "time/score_s": t_score})  # all-reduce: every rank, same keys
        if cfg.kl_target > 0:
            state["kl_beta"] = kl_controller(state["kl_beta"], m["kl"], cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
        m["kl_beta"] = state["kl_beta"]
        state["tau_pool"] = list(zip(batch["prompt_ids"], model.responses(batch)))
        state["step"] = step + 1
        if "gvm/reward_corr" in m:  # value drift: the last step's value goes to summary.json
            state["reward_corr"] = m["gvm/reward_corr"]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            tu.append_jsonl(metrics_path, m)
        bar.set_postfix(**({"reward": f"{m['reward']:.3f}"} if "reward" in m else {}), ret=f"{m['gvm/return']:.3f}",
                        kl=f"{m['kl']:.3f}", clip=f"{m['clipfrac']:.2f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint.save_checkpoint(ckpt, tok, state, trained)  # a collective: rank 0 writes

    # final evaluation and outputs
    summary = {"train/steps": state["step"], "train/seconds": time.time() - t_start, "advantage": cfg.advantage,
               "tau_k": tau_k, "gvm/scale": scale, **evaluation.eval_summary(state["before"], evaluate())}
    if "reward_corr" in state:
        summary["gvm/reward_corr_final"] = state["reward_corr"]
    checkpoint.save_checkpoint(ckpt, tok, state, trained)
    checkpoint.save_hf(policy, tok, cfg.out_dir)  # a collective: rank 0 gathers and writes
    tu.finish(cfg.out_dir, summary)
    fu.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError, tu.NonFiniteError) as e:  # bad input, a flag or a NaN: one line
        sys.exit(f"dvpo.py: {e}")
