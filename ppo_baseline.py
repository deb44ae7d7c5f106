"""ppo_baseline.py — standard RLHF, the baseline DVPO is compared against: a Bradley-Terry reward
model, then actor-critic PPO with GAE (docs/algorithm.md §6). Same rollout, clipped policy loss,
normalization, hyperparameters and logging as dvpo.py (the algorithm pieces are imported from it),
so the only differences are the ones the paper (arXiv:2502.16944v1) claims matter: a reward model
instead of a GVM, and a trained critic.

  Stage rm (Bradley-Terry, on exactly the GVM's preference pairs and split):
    1. r(x, y) = head(h) at the last response token (the terminal entry of the value chain).
    2. L_RM = -log σ(r(x, y_chosen) - r(x, y_rejected)).
  Stage ppo, per step:
    3. Rollout, then frozen forwards once per batch: old log-probs, reference log-probs, RM score,
       and the critic's old values V_t (a value head on every position, V_t = u_{P+t-2}).
    4. Rewards r_t = -β (log π - log π_ref)_t + [t = T] r(x, y); GAE(γ, λ) -> A_t, returns A_t + V_t;
       A whitened over the global batch.
    5. E epochs × minibatches: clipped policy loss (dvpo.ppo_clip_loss) + clipped value loss
         L_V = ½ mean_t max((V_t - R_t)², (V_old,t + clip(V_t - V_old,t, ±c) - R_t)²)
       on the critic, which has its own optimizer.

Launch:
  python ppo_baseline.py                       # built-in task: RM on out/gvm's pairs, PPO -> out/ppo
  python ppo_baseline.py --stage rm            # only the reward model -> out/ppo/rm
  python ppo_baseline.py --model <path> --data prefs.jsonl --prompts prompts.jsonl
  torchrun --nproc_per_node 8 ppo_baseline.py --model <path> --data prefs.jsonl --prompts prompts.jsonl
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
import fsdp_utils as fu
import train_utils as tu
from dvpo import BATCH_KEYS, gae, kl_controller, masked_batch_norm, masked_mean, ppo_clip_loss, terminal

RM_CONFIG, CRITIC_CONFIG = "rm_config.json", "critic_config.json"


@dataclass
class Config:
    stage: str = "all"  # rm | ppo | all (rm, then ppo)
    model: str = "out/sft"  # initial policy, reference, and RM/critic backbone initialization
    data: str = ""  # preference file for the RM; empty = out/gvm/pairs_train.jsonl (the GVM's pairs)
    eval_data: str = ""  # held-out pairs; empty = out/gvm/pairs_eval.jsonl (or eval_frac of --data)
    eval_frac: float = 0.05
    rm: str = ""  # trained reward model folder for --stage ppo; empty = out_dir/rm
    prompts: str = ""  # prompts JSONL/JSON ({prompt} or {messages}); empty = built-in task
    out_dir: str = "out/ppo"
    # reward model
    rm_epochs: int = 2  # same budget as gvm.py: 2 epochs, batch 32, lr 3e-4
    rm_batch_size: int = 32  # pairs per step, global
    rm_lr: float = 3e-4
    max_prompt_len: int = 512
    max_response_len: int = 512
    skip_bad: bool = False
    # PPO: identical defaults to dvpo.py
    steps: int = 40
    batch_size: int = 64
    minibatch_size: int = 32
    micro_batch_size: int = 32
    ppo_epochs: int = 4
    lr: float = 2e-4
    critic_lr: float = 2e-4
    warmup_steps: int = 10
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    value_clip: float = 0.2  # clip range of the value loss (around the rollout-time values)
    normalize_reward: bool = True  # divide the RM score (and the critic's initial head) by the RM's held-out std
    kl_beta: float = 0.1  # PPO's best on the frontier too: the same rule (docs/results.md)
    kl_target: float = 0.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    gradient_checkpointing: bool = False
    frozen_dtype: str = "auto"  # reference and reward model (dvpo.py: reference and GVM)
    eval_prompts: int = 1024
    eval_reward: str = ""
    save_every: int = 20
    resume: str = "no"  # no | auto | yes, as in dvpo.py; resuming PPO with --stage all reuses out_dir/rm
    overwrite: bool = False
    log_every: int = 1
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------------------------
# Pure functions: Bradley-Terry loss, PPO advantages, clipped value loss

def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Pairwise Bradley-Terry loss -log σ(r_c - r_r) per pair, (B,) -> (B,)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def ppo_advantages(values: torch.Tensor, score: torch.Tensor, r_kl: torch.Tensor, mask: torch.Tensor,
                   gamma: float, lam: float) -> torch.Tensor:
    """GAE with the critic's V_t and r_t = r^KL_t + [t = T] score. values, r_kl, mask: (B, T);
    score: (B,). With values = w_{t-1} and score = w_T this is dvpo.td_advantages."""
    is_last = torch.zeros_like(mask).scatter(1, (mask.sum(1).long() - 1).clamp(min=0)[:, None], 1.0) * mask
    return gae(values, r_kl + is_last * score[:, None], mask, gamma, lam)


def value_loss_clipped(values, old_values, returns, mask, clip: float, n_tokens: float) -> torch.Tensor:
    """½ Σ max((V - R)², (V_old + clip(V - V_old, ±c) - R)²) / n_tokens, all (B, T)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * (torch.max((values - returns) ** 2, (v_clipped - returns) ** 2) * mask).sum() / n_tokens


# ----------------------------------------------------------------------------------------------
# Stage rm: Bradley-Terry reward model on the GVM's pairs

def load_reward_model(path: str, device="cpu", dtype=torch.float32, frozen: bool = False):
    """(value model, tokenizer, rm_config) of a trained reward model folder (see tu.load_value_model)."""
    return tu.load_value_model(path, RM_CONFIG, "train one with `python ppo_baseline.py --stage rm`", device, dtype,
                               frozen)


def load_pairs(cfg: Config):
    """(train rows, held-out rows): --data/--eval_data, or the exact pairs gvm.py trained on."""
    if not cfg.data:
        train_path, eval_path = "out/gvm/pairs_train.jsonl", "out/gvm/pairs_eval.jsonl"
        if not os.path.exists(train_path):
            sys.exit("ppo_baseline.py: out/gvm/pairs_train.jsonl is missing; run `python gvm.py` first "
                     "(the reward model trains on exactly the GVM's pairs), or pass --data")
        return [json.loads(line) for line in open(train_path)], [json.loads(line) for line in open(eval_path)]
    train, held = tu.load_rows(cfg.data, cfg.eval_data, "preference", cfg.skip_bad, cfg.eval_frac, cfg.seed)
    if not held:  # (as in gvm.py)
        sys.exit(f"ppo_baseline.py: {cfg.data}: {len(train)} pair(s); the reward model needs at least 2 (one held "
                 "out), or pass --eval_data")
    return train, held


def pair_batch(rows: list[dict], tok, cfg: Config, trunc) -> dict:
    """Chosen and rejected of each pair as consecutive rows (0::2 chosen, 1::2 rejected)."""
    prompts, responses = [], []
    for r in rows:
        p = data.encode_prompt(tok, r["prompt"], cfg.max_prompt_len, trunc)
        for k in ("chosen", "rejected"):
            prompts.append(p)
            responses.append(data.encode_response(tok, r[k], cfg.max_response_len, trunc))
    return data.collate_right(prompts, responses, tok.pad_token_id)


def scores(model, batch: dict, device) -> torch.Tensor:
    """r(x, y): the model's value at the last response token, (B,)."""
    b = {k: batch[k].to(device) for k in BATCH_KEYS}
    u = model(b["input_ids"], b["attention_mask"]).float()
    return terminal(*data.value_chain(u, b["prompt_len"], b["response_len"]))


def train_rm(cfg: Config, device) -> str:
    tok = tu.load_tokenizer(cfg.model)
    train, held = load_pairs(cfg)
    trunc = data.TruncationStats()
    fu.print0(f"reward model: {len(train)} training pairs, {len(held)} held out")
    model = tu.new_value_model(cfg.model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rm_lr, weight_decay=0.0)
    per_epoch = len(train) // cfg.rm_batch_size
    if per_epoch == 0:
        sys.exit(f"ppo_baseline.py: {len(train)} training pairs is fewer than one batch of {cfg.rm_batch_size}; "
                 "lower --rm_batch_size")
    total, step, t0 = per_epoch * cfg.rm_epochs, 0, time.time()
    out = os.path.join(cfg.out_dir, "rm")
    metrics_path = os.path.join(cfg.out_dir, "rm_metrics.jsonl")
    if fu.rank() == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    bar = tqdm(total=total, desc="rm", disable=fu.rank() != 0)
    for epoch in range(cfg.rm_epochs):
        order = list(range(len(train)))
        tu.python_rng(cfg.seed, "rm/order", epoch).shuffle(order)
        for s in range(per_epoch):
            idx = order[s * cfg.rm_batch_size:(s + 1) * cfg.rm_batch_size][fu.rank()::fu.world()]
            r = scores(model, pair_batch([train[i] for i in idx], tok, cfg, trunc), device)
            loss = bt_loss(r[0::2], r[1::2]).sum() / cfg.rm_batch_size * fu.world()  # global pair mean
            for g in opt.param_groups:
                g["lr"] = tu.lr_at(step, total, 10, cfg.rm_lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            fu.grad_norm_clip(model, cfg.grad_clip)
            opt.step()
            if step % 20 == 0:
                m = fu.reduce_metrics({"rm/loss": loss.item()}, device)
                fu.append_jsonl(metrics_path, {"step": step, **m})
                bar.set_postfix(loss=f"{m['rm/loss']:.3f}")
            bar.update(1)
            step += 1
    bar.close()
    model.eval()
    with torch.no_grad():  # replicated on every rank: held-out sets are small
        r = torch.cat([scores(model, pair_batch(held[i:i + 128], tok, cfg, trunc), device).cpu()
                       for i in range(0, len(held), 128)])
    summary = {"rm/pairwise_accuracy": tu.pairwise_accuracy(r[0::2], r[1::2]), "rm/pairs": len(train),
               "rm/eval_pairs": len(held), "rm/seconds": time.time() - t0,
               # the scale PPO divides the score by (docs/algorithm.md §7), over every held-out response
               "value_mean": r.double().mean().item(), "value_std": r.double().std(unbiased=False).item()}
    if "gold_chosen" in held[0]:
        g = torch.tensor([[h["gold_chosen"], h["gold_rejected"]] for h in held])
        summary["rm/gold_pairwise_accuracy"] = tu.pairwise_accuracy(g[:, 0], g[:, 1])
    checkpoint.save_value_model(model, tok, out, RM_CONFIG, {"reward": "bradley_terry", **summary})
    fu.print0(" | ".join(f"{k} {v:.4g}" for k, v in summary.items()) + f" | trunc: {trunc.summary()}")
    return out


# ----------------------------------------------------------------------------------------------
# The step: score a rollout with the frozen models and the critic, then update policy and critic

@torch.no_grad()
def init_critic(critic, scale: float):
    """The critic starts as the reward model, on the unit scale of the returns it will fit: the score
    is divided by `scale` (docs/algorithm.md §7), so its value head is too."""
    critic.value_head.weight.div_(scale)
    critic.value_head.bias.div_(scale)


def critic_values(critic, batch: dict, T: int) -> torch.Tensor:
    """V_t = V(s_t) for t = 1..T: the critic's value at the last token of s_t = x ⊕ y_<t, i.e. at
    position P+t-2 (the value chain's w_{t-1}); a fixed width T for every micro-batch. (B, T)"""
    u = critic(batch["input_ids"], batch["attention_mask"]).float()
    return data.gather_response(u, batch["prompt_len"] - 1, T)


def score(policy, ref, rm, critic, batch: dict, beta: float, scale: float, cfg: Config, device) -> dict:
    """Steps 3-4: the frozen forwards and the critic's old values, once per rollout batch, the KL
    penalty, GAE and the returns. `scale`: the RM's held-out std (1 = raw scores). Returns mask,
    old_logp, kl, old_values, returns, adv (B, T) and the RM score (B,), divided by scale."""
    T = batch["response"].shape[1]
    mask = data.response_mask(batch["response_len"], T)  # (B, T)
    old_logp = tu.frozen_logprobs(policy, batch, T, cfg.temperature)
    ref_logp = tu.frozen_logprobs(ref, batch, T, cfg.temperature)
    with torch.inference_mode():  # PPO only: the reward model
        rm_score = scores(rm, batch, device).clone() / scale  # r(x, y) on a unit scale (§7), (B,)
        fu.reshard(rm)
    with torch.no_grad():  # PPO only: the critic is trained, so no_grad, not inference_mode (tu.frozen_logprobs)
        old_values = critic_values(critic, batch, T) * mask  # V_t = w_{t-1}
        fu.reshard(critic)
    kl = (old_logp - ref_logp) * mask  # k1 estimator
    r_kl = -beta * kl
    adv_raw = ppo_advantages(old_values, rm_score, r_kl, mask, cfg.gamma, cfg.lam)
    returns = (adv_raw + old_values) * mask
    adv = masked_batch_norm(adv_raw, mask)
    return {"mask": mask, "old_logp": old_logp, "kl": kl, "score": rm_score, "old_values": old_values,
            "returns": returns, "adv": adv}


def update(policy, critic, opt, critic_opt, batch: dict, sc: dict, cfg: Config, step: int,
           opt_step: int) -> tuple[dict, int]:
    """Step 5: E epochs × minibatches × micro-batches of the clipped policy loss, and (PPO only)
    the critic's clipped value loss. Returns the step's mean stats and the new optimizer-step count."""
    world = fu.world()
    per_rank, mb_rank = cfg.batch_size // world, cfg.minibatch_size // world
    micro, mask, T = min(cfg.micro_batch_size, mb_rank), sc["mask"], sc["mask"].shape[1]
    total = cfg.steps * cfg.ppo_epochs * (per_rank // mb_rank)  # optimizer steps of the run (LR schedule)
    stats = {"clipfrac": [], "approx_kl": [], "entropy": [], "grad_norm": [], "value_loss": [], "critic_grad_norm": []}
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(per_rank, generator=tu.torch_rng(cfg.seed, "minibatch", step, epoch))
        for mb in range(0, per_rank, mb_rank):
            mb_idx = perm[mb:mb + mb_rank]
            n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone()).item()  # global minibatch tokens
            lr_now = tu.lr_at(opt_step, total, cfg.warmup_steps, 1.0)
            for o, base in ((opt, cfg.lr), (critic_opt, cfg.critic_lr)):
                for g in o.param_groups:
                    g["lr"] = base * lr_now
            opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            for mi in range(0, mb_rank, micro):
                for m in (policy, critic):  # FSDP: reduce-scatter after the last micro-batch only
                    fu.grad_sync(m, mi + micro >= mb_rank)
                i = mb_idx[mi:mi + micro].to(mask.device)
                sub = {k: batch[k][i] for k in BATCH_KEYS}
                logp, entropy = data.response_logprobs(policy, sub, T, cfg.temperature)
                loss, s = ppo_clip_loss(logp, sc["old_logp"][i], sc["adv"][i], mask[i], cfg.clip_eps, n_tokens)
                (loss * world).backward()  # FSDP averages gradients over ranks: undo it
                values = critic_values(critic, sub, T)  # PPO only: the value loss
                vloss = value_loss_clipped(values, sc["old_values"][i], sc["returns"][i], mask[i], cfg.value_clip,
                                           n_tokens)
                (vloss * world).backward()
                stats["clipfrac"].append(s["clipfrac"])
                stats["approx_kl"].append(s["approx_kl"])
                stats["entropy"].append(masked_mean(entropy.detach(), mask[i]).item())
                stats["value_loss"].append(vloss.item() * world)
            stats["grad_norm"].append(fu.grad_norm_clip(policy, cfg.grad_clip))
            stats["critic_grad_norm"].append(fu.grad_norm_clip(critic, cfg.grad_clip))
            tu.check_finite(stats["grad_norm"][-1], "gradient norm (policy loss)", step + 1)  # all-reduced: every
            tu.check_finite(stats["critic_grad_norm"][-1], "gradient norm (value loss)", step + 1)  # rank agrees
            opt.step()
            critic_opt.step()
            opt_step += 1
    for o in (opt, critic_opt):  # no gradients held through the next rollout and frozen forwards
        o.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in stats.items()}, opt_step


# ----------------------------------------------------------------------------------------------
# main: the recipe (same order as dvpo.py; the additions are marked "PPO only")

def main(cfg: Config):
    device = fu.setup(cfg.device)
    if cfg.stage not in ("rm", "ppo", "all"):
        sys.exit(f"ppo_baseline.py: --stage must be rm, ppo or all, got {cfg.stage!r}")
    if cfg.model.startswith("out/") and not os.path.exists(cfg.model):
        sys.exit(f"ppo_baseline.py: {cfg.model} is missing; run `python sft.py` first")
    tu.check_batch_sizes(cfg, fu.world(), "ppo_baseline.py")
    if cfg.rm_batch_size % fu.world():
        sys.exit(f"ppo_baseline.py: --rm_batch_size {cfg.rm_batch_size} must be divisible by the "
                 f"{fu.world()} processes")
    tu.seed_everything(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    rm_path = cfg.rm or os.path.join(cfg.out_dir, "rm")
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    resume = cfg.stage != "rm" and checkpoint.resume_or_fresh(ckpt, cfg.resume, cfg.overwrite, "ppo_baseline.py")
    if cfg.stage == "rm" or (cfg.stage == "all" and not resume):  # PPO only: the reward model, trained first
        rm_path = train_rm(cfg, device)
        if cfg.stage == "rm":
            fu.cleanup()
            return json.load(open(os.path.join(rm_path, RM_CONFIG)))
    elif cfg.stage == "all":  # resuming: the reward model was trained before the first checkpoint
        rm_path = os.path.join(cfg.out_dir, "rm")
    metrics_path = tu.start_metrics(cfg.out_dir, cfg, keep=resume)

    # models: trained policy and critic (PPO only: the critic; fp32 master), frozen reference and reward model
    # in frozen_dtype; all sharded alike under torchrun, each rank loading only its shards
    frozen_dtype = tu.frozen_dtype(cfg.frozen_dtype, device)
    policy, tok = tu.load_policy(ckpt if resume else cfg.model, device)
    ref, _ = tu.load_policy(cfg.model, device, dtype=frozen_dtype, frozen=True)
    rm, _, rm_config = load_reward_model(rm_path, device, dtype=frozen_dtype, frozen=True)
    critic, _, _ = (tu.load_value_model(os.path.join(ckpt, "critic"), CRITIC_CONFIG, "a broken checkpoint", device)
                    if resume else load_reward_model(rm_path, device))  # PPO only: the critic starts as the RM
    scale = tu.value_scale(rm_config, cfg.normalize_reward, rm_path)
    if not resume:
        init_critic(critic, scale)  # on the sharded critic: an elementwise op on this rank's shards
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        critic.backbone.gradient_checkpointing_enable()
    policy.train()
    critic.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)  # PPO only

    # prompts: each rank reads its own shard
    my_texts, my_prompts, eval_prompts, builtin = tu.load_prompts(cfg, tok, data.TruncationStats())
    reward_fn = tu.load_reward_fn(cfg.eval_reward, builtin)

    def evaluate():  # held-out reward and KL to the reference, before and after training
        return tu.evaluate_policy(policy, ref, tok, eval_prompts, device, cfg.seed, cfg.max_new_tokens, reward_fn,
                                  cfg.temperature, cfg.top_p, cfg.max_prompt_len)
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
        batch = tu.rollout(policy, [my_prompts[i] for i in idx], tok, cfg.max_new_tokens, cfg.temperature,
                           cfg.top_p, gen, device)
        t_gen = time.time() - t0

        # 2-4. frozen forwards (PPO only: reward model and critic), KL penalty, GAE with the critic
        sc = score(policy, ref, rm, critic, batch, state["kl_beta"], scale, cfg, device)
        tu.check_finite(sc["adv"], "advantage", step + 1)  # whitened over the global batch: every rank agrees
        t_score = time.time() - t0 - t_gen

        # 5. PPO epochs × minibatches × micro-batches: policy loss, plus the critic's value loss (PPO only)
        stats, state["opt_step"] = update(policy, critic, opt, critic_opt, batch, sc, cfg, step, state["opt_step"])

        # 6. bookkeeping: KL controller, logs, checkpoint
        mask = sc["mask"]
        seq_kl = sc["kl"].sum(1).mean().item()
        if cfg.kl_target > 0:
            state["kl_beta"] = kl_controller(state["kl_beta"], fu.reduce_metrics({"kl": seq_kl}, device)["kl"],
                                             cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
        state["step"] = step + 1
        dt = time.time() - t0
        m = {"rm/score": sc["score"].mean().item(), "critic/value_prompt": sc["old_values"][:, 0].mean().item(),
             "kl": seq_kl, "response_len": batch["response_len"].float().mean().item(),
             "truncated": batch["truncated"].float().mean().item(), **stats}
        if reward_fn is not None:  # reporting only, never in a loss
            r = tu.rewards(reward_fn, [my_texts[i] for i in idx], batch["response"], tok)
            m["reward"] = sum(r) / len(r)  # value drift: does the frozen RM still rank this policy's samples?
            corr = tu.rank_correlation(sc["score"], torch.tensor(r))
            m["rm/reward_corr"] = corr  # nan when every reward of the batch is equal: left out of the mean
        tokens = fu.all_reduce_sum(mask.sum().detach().clone()).item()
        m = tu.step_row(m, device, **{"step": step + 1, "kl_beta": state["kl_beta"], "lr": opt.param_groups[0]["lr"],
                                      "time/step_s": dt, "time/generate_s": t_gen, "time/score_s": t_score,
                                      "tokens_per_s": float(tokens) / dt})
        if "rm/reward_corr" in m:  # value drift: the last step's value goes to summary.json
            state["reward_corr"] = m["rm/reward_corr"]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            fu.append_jsonl(metrics_path, m)
        bar.set_postfix(**({"reward": f"{m['reward']:.3f}"} if "reward" in m else {}), rm=f"{m['rm/score']:.3f}",
                        kl=f"{m['kl']:.3f}", vloss=f"{m['value_loss']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint.save_checkpoint(ckpt, tok, state, trained)

    # final evaluation and outputs
    summary = {"train/steps": state["step"], "train/seconds": time.time() - t_start,
               "rm/pairwise_accuracy": rm_config.get("rm/pairwise_accuracy", float("nan")), "rm/scale": scale,
               **tu.eval_summary(state["before"], evaluate())}
    if "reward_corr" in state:
        summary["rm/reward_corr_final"] = state["reward_corr"]
    checkpoint.save_checkpoint(ckpt, tok, state, trained)
    checkpoint.save_hf(policy, tok, cfg.out_dir)
    checkpoint.save_value_model(critic, tok, os.path.join(cfg.out_dir, "critic"), CRITIC_CONFIG,  # PPO only
                        {"role": "critic", "gamma": cfg.gamma, "lam": cfg.lam})
    tu.finish(cfg.out_dir, summary)
    fu.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main(fu.parse_config(Config))
    except (data.DataError, tu.NonFiniteError) as e:  # bad input or a NaN: one clear line, no traceback
        sys.exit(f"ppo_baseline.py: {e}")
