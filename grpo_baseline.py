"""grpo_baseline.py — critic-free, sequence-level baselines: n responses per prompt, each scored by a
frozen value model at its last token, the advantage a group baseline (GRPO and its relatives). Same
rollout, clipped loss, KL penalty, hyperparameters and logging as dvpo.py (the algorithm pieces are
imported from it), so `diff dvpo.py grpo_baseline.py` shows exactly "a frozen token-level value chain"
against "a group of n samples of the same prompt" (docs/algorithm.md §12).

Per step:
  1. Rollout: y ~ π_θ(·|x) with a KV cache (left-padded prompts, cut at the first EOS); n = --group_size
     responses per prompt, so batch_size / n prompts per step (equal samples per step with dvpo.py).
  2. Frozen forwards, once per rollout batch: old log-probs (π_θ), reference log-probs (π_ref), and
     the score s = w_T of a frozen value model at each response's last token (--reward rm:PATH, a
     Bradley-Terry reward model; or gvm:PATH, a GVM's terminal value); remax: also the greedy response.
  3. KL penalty as a per-token reward: r^KL_t = -β (log π_θ(y_t) - log π_ref(y_t)), as in dvpo.py.
  4. Advantages: A_t = Â_i + Σ_{k≥t} γ^{k-t} r^KL_k (the terminal score replaced by its group estimate,
     the KL reward-to-go per token; no whitening: the group baseline is the estimator), Â_i one of
       grpo    : (s_i - mean_g s) / (std_g s + ε)                          (Shao et al. 2024, arXiv:2402.03300)
       dr_grpo : s_i - mean_g s                                             (Liu et al. 2025, arXiv:2503.20783)
       rloo    : s_i - mean_{j≠i} s_j                   (Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019)
       remax   : s_i - s(greedy response to the same prompt)               (Li et al. 2023, arXiv:2310.10505)
  5. E epochs × minibatches of the clipped objective                                        (Eq. 3)
       L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),  ρ_t = π_θ(y_t) / π_old(y_t)
  Where this code departs from the papers: the KL to the reference is a per-token penalty in the reward
  (so β means what it means in dvpo.py and ppo_baseline.py), not GRPO's k3 loss term; every method's
  loss is one global token mean, so GRPO's per-response 1/|y| is not applied (Dr. GRPO's second change,
  removing it, is therefore the default here: dr_grpo differs from grpo only by not dividing by the std);
  ReMax scores its greedy baseline with the same frozen model and does not train on it.
  Positions (which entry of which tensor is read where): model.py's docstring, docs/algorithm.md §1.

Launch:
  python grpo_baseline.py                        # built-in task: out/sft + out/rm -> out/grpo
  python grpo_baseline.py --reward gvm:out/gvm --estimator rloo      # the same estimators on the GVM's w_T
  torchrun --nproc_per_node 8 grpo_baseline.py --model <path> --reward rm:<path> --prompts prompts.jsonl
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
from dvpo import discounted_cumsum, kl_controller, masked_mean, ppo_clip_loss

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "remax")


@dataclass
class Config:
    model: str = "out/sft"  # initial policy (and frozen reference): hub id or path
    reward: str = "rm:out/rm"  # the frozen scorer: rm:PATH (reward_model.py) or gvm:PATH (gvm.py; its w_T)
    prompts: str = ""  # prompts JSONL/JSON ({prompt} or {messages}); empty = built-in task
    out_dir: str = "out/grpo"
    steps: int = 40  # rollout batches (PPO iterations)
    batch_size: int = 64  # responses per rollout, global
    group_size: int = 4  # GRPO only: responses per prompt, n (batch_size / n prompts per rollout)
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
    estimator: str = "grpo"  # GRPO only: grpo | dr_grpo | rloo | remax (group baselines, see the docstring)
    gamma: float = 1.0
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
# Pure functions: group baselines (docs/algorithm.md §12)

def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, baseline: torch.Tensor | None = None,
                     eps: float = 1e-8) -> torch.Tensor:
    """Â (B,) from scores (B,) of B / n groups of n consecutive rows (the n responses to one prompt):
        grpo    : (s_i - mean_g) / (std_g + ε)   (std with Bessel's correction, as TRL and verl compute it)
        dr_grpo : s_i - mean_g
        rloo    : s_i - (Σ_g s - s_i) / (n - 1)   (= n/(n-1) · (s_i - mean_g))
        remax   : s_i - baseline_i                (baseline (B,): the greedy response's score, per row)
    A group whose scores are all equal gets Â = 0 (never NaN). grpo and rloo need n ≥ 2."""
    if estimator == "remax":
        return scores - baseline
    g = scores.view(-1, group_size)  # (B / n, n)
    mean = g.mean(1, keepdim=True)
    if estimator == "grpo":
        return ((g - mean) / (g.std(1, keepdim=True) + eps)).view(-1)
    if estimator == "dr_grpo":
        return (g - mean).view(-1)
    return ((g - mean) * group_size / (group_size - 1)).view(-1)  # rloo: the leave-one-out mean as baseline


def sequence_advantages(adv_seq: torch.Tensor, r_kl: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token A_t = Â_i + Σ_{k≥t} γ^{k-t} r^KL_k: the group estimate of the terminal score, which every
    token of a response shares (γ = 1: Σ_{k≥t} γ^{k-t} [k = T] Â = Â), plus the KL reward-to-go.
    adv_seq: (B,); r_kl, mask: (B, T) -> (B, T), zero where mask == 0."""
    return (adv_seq[:, None] * gamma ** (mask.sum(1, keepdim=True) - 1 - torch.arange(mask.shape[1],
                                                                                     device=mask.device))
            + discounted_cumsum(r_kl, mask, gamma)) * mask


def within_group_correlation(scores: torch.Tensor, rewards: torch.Tensor, group_size: int) -> float:
    """Mean over groups of Spearman's ρ between a scorer and the reward inside each group of n responses to
    the same prompt (value drift within prompts: a scorer free to give each prompt its own offset is
    judged only on how it orders one prompt's responses); groups where either is constant are left out;
    nan if none is defined. scores, rewards: (B,)."""
    rho = [evaluation.rank_correlation(s, r) for s, r in zip(scores.view(-1, group_size), rewards.view(-1, group_size))]
    rho = [x for x in rho if x == x]
    return sum(rho) / len(rho) if rho else float("nan")


# ----------------------------------------------------------------------------------------------
# The step: score a rollout with the frozen models, then update the policy

def score(policy, ref, scorer, batch: dict, baseline_batch: dict | None, beta: float, scale: float, cfg: Config,
          device) -> dict:
    """Steps 2-4: the frozen forwards, once per rollout batch (reused by every PPO epoch), the KL
    penalty and the advantages. `scale`: the scorer's held-out std (1 = raw scores). baseline_batch
    (remax): the greedy responses, one per group, scored as the baseline. Returns mask, old_logp, kl,
    adv (B, T) and the score s (B,), divided by scale."""
    T = batch["response"].shape[1]
    mask = data.response_mask(batch["response_len"], T)  # (B, T)
    old_logp = model.frozen_logprobs(policy, batch, T, cfg.temperature, cfg.micro_batch_size)
    ref_logp = model.frozen_logprobs(ref, batch, T, cfg.temperature, cfg.micro_batch_size)
    s = model.frozen_terminal_values(scorer, batch, cfg.micro_batch_size) / scale  # GRPO only: s_i = w_T, (B,)
    baseline = None
    if baseline_batch is not None:  # remax: the greedy response's score, repeated for its group
        greedy = model.frozen_terminal_values(scorer, baseline_batch, cfg.micro_batch_size) / scale
        baseline = greedy.repeat_interleave(cfg.group_size)
    kl = (old_logp - ref_logp) * mask  # k1 estimator
    r_kl = -beta * kl
    adv_seq = group_advantages(s, cfg.group_size, cfg.estimator, baseline)  # GRPO only: the group baseline
    adv = sequence_advantages(adv_seq, r_kl, mask, cfg.gamma)
    return {"mask": mask, "old_logp": old_logp, "kl": kl, "score": s, "adv": adv}


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
    kind, reward_path = model.parse_reward(cfg.reward)
    for path, cmd in ((cfg.model, "python sft.py"), (reward_path, model.REWARDS[kind][1])):
        if path.startswith("out/") and not os.path.exists(path):
            sys.exit(f"grpo_baseline.py: {path} is missing; run `{cmd}` first")
    tu.check_choice("estimator", cfg.estimator, ESTIMATORS)  # GRPO only: a group needs two responses to compare
    if cfg.estimator in ("grpo", "rloo") and cfg.group_size < 2:
        raise tu.ConfigError(f"--estimator {cfg.estimator} compares the responses of a group: --group_size must be "
                             f"at least 2, got {cfg.group_size} (with one response per prompt use --estimator remax)")
    if cfg.batch_size % (cfg.group_size * fu.world()):
        raise tu.ConfigError(f"--batch_size {cfg.batch_size} must be a multiple of --group_size {cfg.group_size} "
                             f"× the {fu.world()} processes: every rank holds whole groups")
    tu.check_choice("grad_sync", cfg.grad_sync, ("every", "last"))
    tu.check_batch_sizes(cfg.batch_size, cfg.minibatch_size, cfg.micro_batch_size, fu.world())
    tu.seed_everything(cfg.seed)
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    resume = checkpoint.resume_or_fresh(ckpt, cfg.resume, cfg.overwrite, "grpo_baseline.py")  # recovers the newest
    metrics_path = tu.start_metrics(cfg.out_dir, vars(cfg), keep=resume)

    # models: the trained policy (fp32 master weights) and the frozen ones in frozen_dtype, each rank
    # loading only its shards (FSDP2 under torchrun: fully_shard per block, then root)
    frozen_dtype = model.frozen_dtype(cfg.frozen_dtype, device)
    policy, tok = model.load_policy(cfg.model, device)  # on resume, load_checkpoint overwrites its weights
    ref, _ = model.load_policy(cfg.model, device, dtype=frozen_dtype, frozen=True)
    scorer, _, rcfg = model.load_reward(cfg.reward, device, dtype=frozen_dtype)  # GRPO only: the frozen scorer
    scale = model.value_scale(rcfg, cfg.normalize_reward, reward_path)
    if warning := model.chance_warning(rcfg, reward_path):  # a value model at chance: say so before RL
        fu.print0(warning)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(policy)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)

    # prompts: each rank keeps its own shard
    n_prompts = cfg.batch_size // cfg.group_size  # GRPO only: prompts per step, each sampled group_size times
    my_texts, my_prompts, eval_prompts, builtin = evaluation.load_prompts(
        cfg.prompts, tok, cfg.steps * n_prompts, cfg.eval_prompts, cfg.max_prompt_len, cfg.seed,
        data.TruncationStats())
    reward_fn = evaluation.load_reward_fn(cfg.eval_reward, builtin)

    def evaluate():  # held-out reward and KL to the reference, before and after training
        return evaluation.evaluate_policy(policy, ref, tok, eval_prompts, device, cfg.seed, cfg.max_new_tokens,
                                          reward_fn, cfg.temperature, cfg.top_p, cfg.max_prompt_len,
                                          cfg.eval_batch_size, cfg.micro_batch_size)

    data.check_context(max(map(len, my_prompts)) + cfg.max_new_tokens, policy.config, "prompt + max_new_tokens")

    state = {"step": 0, "kl_beta": cfg.kl_beta, "opt_step": 0, "before": None}
    trained = {"policy": (policy, opt)}
    if resume:
        checkpoint.load_checkpoint(ckpt, state, trained)
        checkpoint.trim_metrics(metrics_path, state["step"])
        fu.print0(f"resumed from {ckpt} at step {state['step']}")
    if state["before"] is None:
        state["before"] = evaluate()
    fu.print0("before: " + (" | ".join(f"{k} {v:.4f}" for k, v in state["before"].items()) or "no held-out prompts"))

    per_rank = n_prompts // fu.world()  # GRPO only: prompts per rank and step
    t_start = time.time()
    bar = tqdm(range(state["step"], cfg.steps), desc=cfg.estimator, disable=fu.rank() != 0,
               initial=state["step"], total=cfg.steps)
    for step in bar:
        t0 = time.time()
        gen = tu.torch_rng(cfg.seed, "rollout", step, fu.rank(), device=device)  # every draw: (seed, step, rank)
        idx = [(step * per_rank + i) % len(my_prompts) for i in range(per_rank)]

        # 1. rollout: GRPO only: group_size responses per prompt, consecutive rows (and remax: the greedy one)
        batch = model.rollout(policy, [my_prompts[i] for i in idx for _ in range(cfg.group_size)], tok,
                              cfg.max_new_tokens, cfg.temperature, cfg.top_p, gen, device)
        greedy = None
        if cfg.estimator == "remax":
            greedy = model.rollout(policy, [my_prompts[i] for i in idx], tok, cfg.max_new_tokens, 0.0, 1.0, gen,
                                   device)
        t_gen = time.time() - t0

        # 2-4. frozen forwards (GRPO only: the scorer at each response's last token), KL penalty, group advantages
        sc = score(policy, ref, scorer, batch, greedy, state["kl_beta"], scale, cfg, device)
        tu.check_finite(sc["adv"], "advantage", step + 1)  # from global batch statistics: every rank agrees
        t_score = time.time() - t0 - t_gen

        # 5. PPO epochs × minibatches × micro-batches; no value loss
        stats, state["opt_step"] = update(policy, opt, batch, sc, cfg, step, state["opt_step"])

        # 6. bookkeeping: logs, KL controller, checkpoint
        mask = sc["mask"]
        dt = time.time() - t0
        m = {f"{kind}/score": sc["score"].mean(), "kl": sc["kl"].sum(1).mean(),
             "response_len": batch["response_len"].float().mean(), "truncated": batch["truncated"].float().mean(),
             "tokens_per_s": mask.sum() * fu.world() / dt, **tu.mean_of(stats)}  # mean_of: CPU-GPU sync
        if reward_fn is not None:  # reporting only, never in a loss
            texts = [my_texts[i] for i in idx for _ in range(cfg.group_size)]
            stops = data.stop_token_ids(tok, policy.generation_config)  # the rollout's stop tokens
            r = evaluation.rewards(reward_fn, texts, batch["response"], tok, stops)
            m["reward"] = sum(r) / len(r)  # value drift: does the frozen scorer still rank this policy's samples?
            r = torch.tensor(r)
            m[f"{kind}/reward_corr"] = evaluation.rank_correlation(sc["score"], r)  # nan: left out of the mean
            m[f"{kind}/reward_corr_within_prompt"] = within_group_correlation(sc["score"].cpu(), r, cfg.group_size)
        m = tu.step_row(m, device, step=step + 1, lr=opt.param_groups[0]["lr"], **{
            "time/step_s": dt, "time/generate_s": t_gen, "time/score_s": t_score})  # all-reduce: every rank, same keys
        if cfg.kl_target > 0:
            state["kl_beta"] = kl_controller(state["kl_beta"], m["kl"], cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
        m["kl_beta"] = state["kl_beta"]
        state["step"] = step + 1
        for key in (f"{kind}/reward_corr", f"{kind}/reward_corr_within_prompt"):  # value drift: the last step's
            if key in m:  # value goes to summary.json
                state[key] = m[key]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            tu.append_jsonl(metrics_path, m)
        bar.set_postfix(**({"reward": f"{m['reward']:.3f}"} if "reward" in m else {}),
                        score=f"{m[f'{kind}/score']:.3f}", kl=f"{m['kl']:.3f}", clip=f"{m['clipfrac']:.2f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint.save_checkpoint(ckpt, tok, state, trained)  # a collective: rank 0 writes

    # final evaluation and outputs
    summary = {"train/steps": state["step"], "train/seconds": time.time() - t_start, "estimator": cfg.estimator,
               "reward": cfg.reward, f"{kind}/scale": scale, **evaluation.eval_summary(state["before"], evaluate())}
    for key in (f"{kind}/reward_corr", f"{kind}/reward_corr_within_prompt"):
        if key in state:
            summary[key + "_final"] = state[key]
    checkpoint.save_checkpoint(ckpt, tok, state, trained)
    checkpoint.save_hf(policy, tok, cfg.out_dir)  # a collective: rank 0 gathers and writes
    tu.finish(cfg.out_dir, summary)
    fu.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError, tu.NonFiniteError) as e:  # bad input, a flag or a NaN: one line
        sys.exit(f"grpo_baseline.py: {e}")
