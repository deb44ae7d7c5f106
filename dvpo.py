"""dvpo.py — Decoupled Value Policy Optimization: clipped PPO whose per-token advantages come from
a frozen, pretrained Global Value Model. No reward model, no critic, no value loss (paper §3.3).

Per step (DESIGN.md §3, §4):
  1. Rollout: sample y ~ π_θ(·|x) with a KV cache (left-padded prompts, cut at the first EOS).
  2. Frozen forwards, once per rollout batch: old log-probs (π_θ), reference log-probs (π_ref),
     GVM value chain w_0..w_T on [τ] ⊕ x ⊕ y (τ: K rollouts of the previous step, other prompts).
  3. KL penalty as a per-token reward: r^KL_t = -β (log π_θ(y_t) - log π_ref(y_t)).
  4. Advantages, one of:
       td    : V_t = w_{t-1}, r_t = r^KL_t + [t = T] w_T, GAE(γ, λ), then whitened over the global batch
       paper : A_t = BN(Q)_t + Σ_{k≥t} γ^{k-t} r^KL_k with Q_t = w_t        (DVPO Eq. 2)
     where BN is masked batch normalization over the global batch.
  5. E epochs × minibatches of the clipped objective (DVPO Eq. 3):
       L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),  ρ_t = π_θ(y_t) / π_old(y_t)
  What DVPO removes from ppo_baseline.py: the reward model forward and the critic (its forward,
  value loss, backward and optimizer). Compare the two files side by side.

Launch:
  python dvpo.py                                        # built-in task: out/sft + out/gvm -> out/dvpo
  python dvpo.py --policy <hub id or path> --gvm out/gvm --prompts prompts.jsonl
  torchrun --nproc_per_node 8 dvpo.py --policy <path> --gvm <path> --prompts prompts.jsonl
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import fsdp_utils as fu
from gvm import load_gvm, tau_prefix, value_chain
from sft import load_policy, lr_at


@dataclass
class Config:
    policy: str = "out/sft"  # initial policy (and frozen reference): hub id or path
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
    kl_beta: float = 0.2  # KL penalty β, the paper's (initial β when kl_target > 0)
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
    eval_prompts: int = 1024  # held-out prompts for the before/after evaluation
    save_every: int = 20  # steps between checkpoints (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_after: int = 0  # > 0: save a checkpoint and exit after this step, as if killed (tests resume)
    log_every: int = 1
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------------------------
# Pure functions: normalization, advantages, PPO loss (DESIGN.md §3-4)

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_batch_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - μ) / (σ + ε) with the population μ, σ of the entries where mask == 1 across the GLOBAL
    batch (Σx, Σx², n all-reduced over ranks); zeros where mask == 0, and everywhere if n ≤ 1.
    x, mask: (B, T). DVPO Eq. (2)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # statistics of the global batch
    s, s2, n = stats.tolist()
    if n <= 1:
        return torch.zeros_like(x)
    mu = s / n
    sigma = math.sqrt(max(s2 / n - mu * mu, 0.0))
    return (x - mu) / (sigma + eps) * mask


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
    """GAE with the frozen GVM as both critic and terminal reward (DESIGN.md §3, `td`):
    V_t = w_{t-1}, r_t = r^KL_t + [t = T] w_T.  w: (B, T+1) chain, r_kl and mask: (B, T).
    Returns A (B, T) before whitening. With λ = 1, β = 0: Σ_t δ_t = w_T - w_0."""
    T = mask.shape[1]
    w_T = terminal(w[:, 1:], mask)  # Q(s_T, a_T) ≈ r(x, y)
    is_last = torch.zeros_like(mask).scatter(1, (mask.sum(1).long() - 1).clamp(min=0)[:, None], 1.0) * mask
    return gae(w[:, :T], r_kl + is_last * w_T[:, None], mask, gamma, lam)


def paper_advantages(w: torch.Tensor, r_kl: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """DVPO Eq. (2): A_t = BN(Q)_t + Σ_{k≥t} γ^{k-t} r^KL_k, with Q_t = w_t (post-token values).
    w: (B, T+1) chain, r_kl and mask: (B, T)."""
    return masked_batch_norm(w[:, 1:], mask) + discounted_cumsum(r_kl, mask, gamma)


def ppo_clip_loss(logp, old_logp, adv, mask, clip_eps: float, n_tokens: float):
    """Clipped surrogate (DVPO Eq. 3, PPO). All (B, T); n_tokens = valid tokens of the global
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
# Rollout and frozen scoring (shared with ppo_baseline.py)

@torch.no_grad()
def rollout(policy, prompt_ids: list[list[int]], tok, max_new_tokens: int, temperature: float, top_p: float,
            generator, device, min_new_tokens: int = 0) -> dict:
    """Sample one response per prompt. Layout: left-padded prompts (width P) ⊕ right-padded
    responses (width T), so every row's response starts at column P: prompt_len = P for all rows."""
    enc = data.collate_left(prompt_ids, tok.pad_token_id)
    enc = {k: v.to(device) for k, v in enc.items()}
    with fu.gathered(policy):  # eval mode, parameters gathered once for the whole rollout
        resp, resp_len, truncated = data.generate(
            policy, enc["input_ids"], enc["attention_mask"], max_new_tokens, tok.eos_token_id,
            tok.pad_token_id, temperature, top_p, generator, min_new_tokens)
    B, P, T = resp.shape[0], enc["input_ids"].shape[1], resp.shape[1]
    return {"input_ids": torch.cat([enc["input_ids"], resp], 1),
            "attention_mask": torch.cat([enc["attention_mask"], data.response_mask(resp_len, T).long()], 1),
            "prompt_len": torch.full((B,), P, device=device), "response_len": resp_len,
            "truncated": truncated, "response": resp, "prompt_ids": prompt_ids}


@torch.no_grad()
def frozen_logprobs(model, batch: dict, T: int, temperature: float) -> torch.Tensor:
    """log π(y_t | s_t) with no gradient: the reference, or the policy before the update.
    (no_grad, not inference_mode: under FSDP2 inference_mode would turn the trained policy's
    gathered parameter buffers into inference tensors, which its next training step cannot update.)"""
    logp, _ = data.response_logprobs(model, batch, T, temperature)
    fu.reshard(model)  # FSDP2 keeps the root gathered after forward: free it
    return logp.clone()


@torch.inference_mode()
def gvm_values(gvm, batch: dict, tau: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """GVM value chain (B, T+1) on [τ_b] ⊕ x_b ⊕ y_b, computed once per rollout batch."""
    prompts = [t + p for t, p in zip(tau, batch["prompt_ids"])]
    resp = [row[:n].tolist() for row, n in zip(batch["response"], batch["response_len"])]
    g = {k: v.to(device) for k, v in data.collate_right(prompts, resp, pad_id).items()}
    w, _ = value_chain(gvm(g["input_ids"], g["attention_mask"]).float(), g["prompt_len"], g["response_len"])
    fu.reshard(gvm)
    return w.clone()


def draw_tau_from_pool(pool: list, prompt_ids: list[list[int]], K: int, gcfg: dict, rng: random.Random) -> list[list[int]]:
    """τ for each prompt: K (prompt, response) pairs of the current policy from the previous step
    (or this step at step 0, when the policy is still the SFT policy), with a different prompt."""
    if K == 0:
        return [[] for _ in prompt_ids]
    out = []
    for p in prompt_ids:
        cands = [c for c in pool if c[0] != p]
        picks = rng.sample(cands, K) if len(cands) >= K else [rng.choice(pool) for _ in range(K)]
        out.append(tau_prefix(picks, gcfg["tau_prompt_len"], gcfg["tau_response_len"]))
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation (held-out prompts): gold reward (built-in), KL to the reference

@torch.no_grad()
def evaluate(policy, ref, tok, prompts: list, cfg, device, builtin: bool) -> dict:
    """Sampled at the training temperature (mean, stderr) and greedy; KL to the reference
    Σ_t (log π - log π_ref) per sampled response. Each rank evaluates its shard."""
    mine = data.shard(prompts, fu.rank(), fu.world())
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345 + fu.rank())
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # on the device: NCCL reduces no CPU tensors
    for i in range(0, len(mine), 256):
        texts = mine[i:i + 256]
        ids = [data.encode_prompt(tok, p, cfg.max_prompt_len) for p in texts]
        b = rollout(policy, ids, tok, cfg.max_new_tokens, cfg.temperature, cfg.top_p, gen, device)
        T = b["response"].shape[1]
        mask = data.response_mask(b["response_len"], T)
        kl = ((frozen_logprobs(policy, b, T, cfg.temperature) - frozen_logprobs(ref, b, T, cfg.temperature)) * mask).sum(1)
        bg = rollout(policy, ids, tok, cfg.max_new_tokens, 0.0, 1.0, gen, device)  # greedy
        g, gg = ([data.gold_reward(p, data.decode_response(tok, r.tolist())) if builtin else 0.0
                  for p, r in zip(texts, x["response"])] for x in (b, bg))
        g, gg = torch.tensor(g, dtype=torch.float64), torch.tensor(gg, dtype=torch.float64)
        sums += torch.stack([g.sum(), (g * g).sum(), gg.sum(), kl.double().sum().cpu(), torch.tensor(len(texts), dtype=torch.float64),
                             b["response_len"].double().sum().cpu()]).to(device)
    fu.all_reduce_sum(sums)
    s, s2, sg, skl, n, sl = sums.tolist()
    out = {"kl_to_ref": skl / n, "response_len": sl / n}
    if builtin:
        m = s / n
        out.update({"gold_reward": m, "gold_reward_stderr": math.sqrt(max(s2 / n - m * m, 0) / max(n - 1, 1)),
                    "gold_reward_greedy": sg / n})
    return out


# ----------------------------------------------------------------------------------------------
# Plumbing shared with ppo_baseline.py: prompts, resume, summary

def load_prompts(cfg, tok, trunc: data.TruncationStats):
    """(this rank's prompt texts, their token ids, held-out prompt texts, builtin?). Built-in task:
    steps × batch_size training prompts and eval_prompts held-out ones; a file: the first
    min(eval_prompts, 10%) prompts are held out. Each rank reads its own shard."""
    builtin = not cfg.prompts
    if builtin:
        train_prompts = data.builtin_prompts(cfg.steps * cfg.batch_size, "train", seed=cfg.seed + 7)
        eval_prompts = data.builtin_prompts(cfg.eval_prompts, "eval", seed=0)
    else:
        rows, stats = data.load_records(cfg.prompts, "prompt")
        fu.print0(stats.summary())
        n_eval = min(cfg.eval_prompts, len(rows) // 10)
        eval_prompts, train_prompts = [r["prompt"] for r in rows[:n_eval]], [r["prompt"] for r in rows[n_eval:]]
    my_texts = data.shard(train_prompts, fu.rank(), fu.world())
    my_prompts = [data.encode_prompt(tok, p, cfg.max_prompt_len, trunc) for p in my_texts]
    fu.print0(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held out; {trunc.summary()}")
    return my_texts, my_prompts, eval_prompts, builtin


def check_batch_sizes(cfg, world: int, script: str):
    """Rollout batch -> minibatches -> per-rank micro-batches must divide evenly."""
    for name in ("batch_size", "minibatch_size"):
        if getattr(cfg, name) % world:
            sys.exit(f"{script}: --{name} {getattr(cfg, name)} must be divisible by the {world} processes")
    mb_rank = cfg.minibatch_size // world
    if cfg.batch_size % cfg.minibatch_size or mb_rank % min(cfg.micro_batch_size, mb_rank):
        sys.exit(f"{script}: batch_size must be a multiple of minibatch_size, and minibatch_size/world of micro_batch_size")


def trim_metrics(path: str, step: int):
    """On resume: drop metrics.jsonl rows of steps after the checkpoint (they were lost)."""
    if fu.rank() == 0 and os.path.exists(path):
        rows = [l for l in open(path) if json.loads(l)["step"] <= step]
        open(path, "w").writelines(rows)


def rollout_gold(texts: list[str], responses: torch.Tensor, tok) -> float:
    """Mean gold reward of a rollout batch (built-in task; for reporting only, never in a loss)."""
    return sum(data.gold_reward(p, data.decode_response(tok, r.tolist())) for p, r in zip(texts, responses)) / len(texts)


def gold_summary(before: dict, after: dict) -> dict:
    """summary.json's held-out gold-reward entries (built-in task)."""
    return {"eval/gold_reward_before": before["gold_reward"], "eval/gold_reward_after": after["gold_reward"],
            "eval/gold_reward_stderr": after["gold_reward_stderr"],
            "eval/gold_reward_stderr_before": before["gold_reward_stderr"],
            "eval/gold_reward_greedy_before": before["gold_reward_greedy"],
            "eval/gold_reward_greedy_after": after["gold_reward_greedy"]}


# ----------------------------------------------------------------------------------------------
# main: the recipe

def main(cfg: Config):
    device = fu.setup(cfg.device)
    for path, cmd in ((cfg.policy, "python sft.py"), (cfg.gvm, "python gvm.py")):
        if path.startswith("out/") and not os.path.exists(path):
            sys.exit(f"dvpo.py: {path} is missing; run `{cmd}` first")
    if cfg.advantage not in ("td", "paper"):
        sys.exit(f"dvpo.py: --advantage must be 'td' or 'paper', got {cfg.advantage!r}")
    world = fu.world()
    check_batch_sizes(cfg, world, "dvpo.py")
    fu.seed_everything(cfg.seed, per_rank=False)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    resume = cfg.resume and os.path.exists(os.path.join(ckpt, "trainer_state.pt"))
    fu.write_json(os.path.join(cfg.out_dir, "train_config.json"), asdict(cfg))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if fu.rank() == 0 and os.path.exists(metrics_path) and not resume:
        os.remove(metrics_path)

    # models: trained policy, frozen reference (the initial policy), frozen GVM — all sharded alike
    policy, tok = load_policy(ckpt if resume else cfg.policy, device)
    ref, _ = load_policy(cfg.policy, device)
    gvm, _, gcfg = load_gvm(cfg.gvm, device)
    tau_k = gcfg.get("tau_k", 0) if cfg.tau_k < 0 else cfg.tau_k
    for frozen in (ref, gvm):
        frozen.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy, ref, gvm = (fu.shard(m, device) for m in (policy, ref, gvm))
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)

    # prompts: each rank reads its own shard
    my_texts, my_prompts, eval_prompts, builtin = load_prompts(cfg, tok, data.TruncationStats())
    fu.print0(f"tau_k={tau_k}")
    data.check_context(max(map(len, my_prompts)) + cfg.max_new_tokens, policy.config, "prompt + max_new_tokens")

    state = {"step": 0, "kl_beta": cfg.kl_beta, "tau_pool": [], "opt_step": 0, "before": None}
    if resume:
        st = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False) if fu.rank() == 0 else {}
        osd = st.pop("optimizer", {})  # stays on rank 0: sharded out tensor by tensor, not pickled to every rank
        state.update(fu.broadcast_object(st))  # step, KL β, τ pool
        fu.load_full_optim_state_dict(policy, opt, osd)
        trim_metrics(metrics_path, state["step"])
        fu.print0(f"resumed from {ckpt} at step {state['step']}")
    if state["before"] is None:
        state["before"] = evaluate(policy, ref, tok, eval_prompts, cfg, device, builtin)
    fu.print0("before: " + " | ".join(f"{k} {v:.4f}" for k, v in state["before"].items()))

    per_rank, mb_rank = cfg.batch_size // world, cfg.minibatch_size // world
    micro = min(cfg.micro_batch_size, mb_rank)
    t_start = time.time()
    bar = tqdm(range(state["step"], cfg.steps), desc="dvpo", disable=fu.rank() != 0,
               initial=state["step"], total=cfg.steps)
    for step in bar:
        t0 = time.time()
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + fu.rank())
        rng = random.Random(f"{cfg.seed}-{step}-{fu.rank()}")  # every random draw is a function of the step
        idx = [(step * per_rank + i) % len(my_prompts) for i in range(per_rank)]

        # 1. rollout
        batch = rollout(policy, [my_prompts[i] for i in idx], tok, cfg.max_new_tokens, cfg.temperature, cfg.top_p, gen, device)
        t_gen = time.time() - t0
        T = batch["response"].shape[1]
        mask = data.response_mask(batch["response_len"], T)  # (B, T)

        # 2. frozen forwards, once per rollout batch (reused for every PPO epoch)
        old_logp = frozen_logprobs(policy, batch, T, cfg.temperature)
        ref_logp = frozen_logprobs(ref, batch, T, cfg.temperature)
        pool = state["tau_pool"] or list(zip(batch["prompt_ids"], [r[:n].tolist() for r, n in zip(batch["response"], batch["response_len"])]))
        tau = draw_tau_from_pool(pool, batch["prompt_ids"], tau_k, gcfg, rng)
        w = gvm_values(gvm, batch, tau, tok.pad_token_id, device)  # (B, T+1)

        # 3. KL penalty as per-token reward, then advantages
        kl = (old_logp - ref_logp) * mask  # k1 estimator
        r_kl = -state["kl_beta"] * kl
        if cfg.advantage == "td":
            adv = masked_batch_norm(td_advantages(w, r_kl, mask, cfg.gamma, cfg.lam), mask)
        else:
            adv = paper_advantages(w, r_kl, mask, cfg.gamma)  # DVPO Eq. (2)
        t_score = time.time() - t0 - t_gen

        # 4. PPO epochs × minibatches × micro-batches (gradient accumulation); no value loss
        stats = {"clipfrac": [], "approx_kl": [], "entropy": [], "grad_norm": []}
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(per_rank, generator=torch.Generator().manual_seed(step * 31 + epoch))
            for mb in range(0, per_rank, mb_rank):
                mb_idx = perm[mb:mb + mb_rank]
                n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone()).item()  # global minibatch tokens
                for g in opt.param_groups:
                    g["lr"] = lr_at(state["opt_step"], cfg.steps * cfg.ppo_epochs * (per_rank // mb_rank), cfg.warmup_steps, cfg.lr)
                opt.zero_grad(set_to_none=True)
                for mi in range(0, mb_rank, micro):
                    i = mb_idx[mi:mi + micro].to(device)
                    sub = {k: batch[k][i] for k in ("input_ids", "attention_mask", "prompt_len", "response_len")}
                    logp, entropy = data.response_logprobs(policy, sub, T, cfg.temperature)
                    loss, s = ppo_clip_loss(logp, old_logp[i], adv[i], mask[i], cfg.clip_eps, n_tokens)
                    (loss * world).backward()  # FSDP averages gradients over ranks: undo it
                    stats["clipfrac"].append(s["clipfrac"])
                    stats["approx_kl"].append(s["approx_kl"])
                    stats["entropy"].append(masked_mean(entropy.detach(), mask[i]).item())
                stats["grad_norm"].append(fu.grad_norm_clip(policy, cfg.grad_clip))
                opt.step()
                state["opt_step"] += 1

        # 5. bookkeeping: KL controller, τ pool for the next step, logs, checkpoint
        seq_kl = kl.sum(1).mean().item()
        if cfg.kl_target > 0:
            state["kl_beta"] = kl_controller(state["kl_beta"], fu.reduce_metrics({"kl": seq_kl}, device)["kl"],
                                             cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
        state["tau_pool"] = list(zip(batch["prompt_ids"], [r[:n].tolist() for r, n in zip(batch["response"], batch["response_len"])]))
        state["step"] = step + 1
        dt = time.time() - t0
        m = {"gvm/return": terminal(w[:, 1:], mask).mean().item(), "gvm/value_prompt": w[:, 0].mean().item(),
             "kl": seq_kl, "response_len": batch["response_len"].float().mean().item(),
             "truncated": batch["truncated"].float().mean().item(),
             **{k: sum(v) / len(v) for k, v in stats.items()}}
        if builtin:
            m["gold_reward"] = rollout_gold([my_texts[i] for i in idx], batch["response"], tok)
        m = fu.reduce_metrics(m, device)
        m.update({"step": step + 1, "kl_beta": state["kl_beta"], "lr": opt.param_groups[0]["lr"],
                  "time/step_s": dt, "time/generate_s": t_gen, "time/score_s": t_score,
                  "tokens_per_s": float(fu.all_reduce_sum(mask.sum().detach().clone()).item()) / dt,
                  "memory/peak_gb": fu.peak_memory(device) / 2**30})
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            fu.append_jsonl(metrics_path, m)
        bar.set_postfix(gold=f"{m.get('gold_reward', float('nan')):.3f}", ret=f"{m['gvm/return']:.3f}",
                        kl=f"{m['kl']:.3f}", clip=f"{m['clipfrac']:.2f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(policy, opt, tok, state, ckpt)
        if cfg.stop_after and step + 1 >= cfg.stop_after:
            save_checkpoint(policy, opt, tok, state, ckpt)
            fu.print0(f"stopped after step {step + 1} (--stop_after); continue with --resume")
            fu.cleanup()
            return {"train/steps": state["step"]}

    # final evaluation and outputs
    after = evaluate(policy, ref, tok, eval_prompts, cfg, device, builtin)
    before = state["before"]
    summary = {"train/steps": state["step"], "train/seconds": time.time() - t_start, "advantage": cfg.advantage,
               "tau_k": tau_k, "eval/kl_to_ref": after["kl_to_ref"], "eval/response_len": after["response_len"]}
    if builtin:
        summary.update(gold_summary(before, after))
    save_checkpoint(policy, opt, tok, state, ckpt)
    fu.save_hf(policy, tok, cfg.out_dir)
    fu.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    fu.print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    fu.cleanup()
    return summary


def save_checkpoint(policy, opt, tok, state: dict, path: str):
    """Policy (HF format) + optimizer + step + KL β + τ pool, swapped in atomically. Every random
    draw is seeded by the step, so these are all the states a resumed run needs."""
    osd = fu.full_optim_state_dict(policy, opt)
    fu.save_hf(policy, tok, path, extra={"trainer_state.pt": {**state, "optimizer": osd}}, replace_dir=True)


if __name__ == "__main__":
    try:
        main(fu.parse_config(Config))
    except data.DataError as e:  # bad input: one clear line, no traceback
        sys.exit(f"dvpo.py: {e}")
