"""ppo_baseline.py — standard RLHF, the baseline DVPO is compared against: a Bradley-Terry reward
model, then actor-critic PPO with GAE (DESIGN.md §4). Same rollout, clipped policy loss,
normalization, hyperparameters and logging as dvpo.py (imported from it), so the only differences
are the ones the paper claims matter: a reward model instead of a GVM, and a trained critic.

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
  python ppo_baseline.py --policy <path> --pairs prefs.jsonl --prompts prompts.jsonl
  torchrun --nproc_per_node 8 ppo_baseline.py --policy <path> --pairs prefs.jsonl --prompts prompts.jsonl
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
import torch.nn.functional as F
from tqdm import tqdm

import data
import fsdp_utils as fu
from dvpo import (check_batch_sizes, evaluate, frozen_logprobs, gae, gold_summary, kl_controller, load_prompts, masked_batch_norm,
                  masked_mean, ppo_clip_loss, rollout, rollout_gold, terminal, trim_metrics)
from gvm import GVM, load_gvm, pairwise_accuracy, split_gvm_state, value_chain
from sft import load_policy, lr_at


@dataclass
class Config:
    stage: str = "all"  # rm | ppo | all (rm, then ppo)
    policy: str = "out/sft"  # initial policy, reference, and RM/critic backbone initialization
    pairs: str = ""  # preference file for the RM; empty = out/gvm/pairs_train.jsonl (the GVM's pairs)
    eval_pairs: str = ""  # held-out pairs; empty = out/gvm/pairs_eval.jsonl (or eval_frac of --pairs)
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
    kl_beta: float = 0.2
    kl_target: float = 0.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    gradient_checkpointing: bool = False
    eval_prompts: int = 1024
    save_every: int = 20
    resume: bool = False
    stop_after: int = 0
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

def load_pairs(cfg: Config):
    """(train rows, held-out rows): --pairs/--eval_pairs, or the exact pairs gvm.py trained on."""
    if not cfg.pairs:
        train_path, eval_path = "out/gvm/pairs_train.jsonl", "out/gvm/pairs_eval.jsonl"
        if not os.path.exists(train_path):
            sys.exit("ppo_baseline.py: out/gvm/pairs_train.jsonl is missing; run `python gvm.py` first "
                     "(the reward model trains on exactly the GVM's pairs), or pass --pairs")
        return [json.loads(l) for l in open(train_path)], [json.loads(l) for l in open(eval_path)]
    rows, stats = data.load_records(cfg.pairs, "preference", cfg.skip_bad)
    fu.print0(stats.summary())
    if cfg.eval_pairs:
        held, stats = data.load_records(cfg.eval_pairs, "preference", cfg.skip_bad)
        fu.print0(stats.summary())
        return rows, held
    random.Random(cfg.seed).shuffle(rows)
    n = max(1, int(len(rows) * cfg.eval_frac))
    return rows[n:], rows[:n]


def pair_batch(rows: list[dict], tok, cfg: Config, trunc) -> dict:
    """Chosen and rejected of each pair as consecutive rows (0::2 chosen, 1::2 rejected)."""
    prompts, responses = [], []
    for r in rows:
        p = data.encode_prompt(tok, r["prompt"], cfg.max_prompt_len, trunc)
        for k in ("chosen", "rejected"):
            prompts.append(p)
            responses.append(data.encode_response(tok, r[k], cfg.max_response_len, trunc))
    return data.collate_right(prompts, responses, tok.pad_token_id)


def critic_values(critic, batch: dict, T: int) -> torch.Tensor:
    """V_t = V(s_t) for t = 1..T: the critic's value at the last token of s_t = x ⊕ y_<t, i.e. at
    position P+t-2 (the value chain's w_{t-1}); a fixed width T for every micro-batch. (B, T)"""
    u = critic(batch["input_ids"], batch["attention_mask"]).float()
    return data.gather_response(u, batch["prompt_len"] - 1, T)


def scores(model, batch: dict, device) -> torch.Tensor:
    """r(x, y): the model's value at the last response token, (B,)."""
    b = {k: v.to(device) for k, v in batch.items()}
    w, mask = value_chain(model(b["input_ids"], b["attention_mask"]).float(), b["prompt_len"], b["response_len"])
    return terminal(w, mask)


def train_rm(cfg: Config, device) -> str:
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(cfg.policy)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train, held = load_pairs(cfg)
    trunc = data.TruncationStats()
    fu.print0(f"reward model: {len(train)} training pairs, {len(held)} held out")
    model = fu.shard(GVM(AutoModel.from_pretrained(cfg.policy, dtype=torch.float32)), device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rm_lr, weight_decay=0.0)
    per_epoch = len(train) // cfg.rm_batch_size
    total, rng, step, t0 = per_epoch * cfg.rm_epochs, random.Random(cfg.seed), 0, time.time()
    out = os.path.join(cfg.out_dir, "rm")
    metrics_path = os.path.join(cfg.out_dir, "rm_metrics.jsonl")
    if fu.rank() == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    bar = tqdm(total=total, desc="rm", disable=fu.rank() != 0)
    for epoch in range(cfg.rm_epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for s in range(per_epoch):
            idx = order[s * cfg.rm_batch_size:(s + 1) * cfg.rm_batch_size][fu.rank()::fu.world()]
            r = scores(model, pair_batch([train[i] for i in idx], tok, cfg, trunc), device)
            loss = bt_loss(r[0::2], r[1::2]).sum() / cfg.rm_batch_size * fu.world()  # global pair mean
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, 10, cfg.rm_lr)
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
    summary = {"rm/pairwise_accuracy": pairwise_accuracy(r[0::2], r[1::2]), "rm/pairs": len(train),
               "rm/eval_pairs": len(held), "rm/seconds": time.time() - t0}
    if "gold_chosen" in held[0]:
        g = torch.tensor([[h["gold_chosen"], h["gold_rejected"]] for h in held])
        summary["rm/gold_pairwise_accuracy"] = pairwise_accuracy(g[:, 0], g[:, 1])
    from gvm import save_gvm
    save_gvm(model, tok, out, {"reward": "bradley_terry", **summary})
    fu.print0(" | ".join(f"{k} {v:.4g}" for k, v in summary.items()) + f" | trunc: {trunc.summary()}")
    return out


# ----------------------------------------------------------------------------------------------
# main: the recipe (same order as dvpo.py; the additions are marked "PPO only")

def main(cfg: Config):
    device = fu.setup(cfg.device)
    if cfg.stage not in ("rm", "ppo", "all"):
        sys.exit(f"ppo_baseline.py: --stage must be rm, ppo or all, got {cfg.stage!r}")
    if cfg.policy.startswith("out/") and not os.path.exists(cfg.policy):
        sys.exit(f"ppo_baseline.py: {cfg.policy} is missing; run `python sft.py` first")
    world = fu.world()
    check_batch_sizes(cfg, world, "ppo_baseline.py")
    if cfg.rm_batch_size % world:
        sys.exit(f"ppo_baseline.py: --rm_batch_size {cfg.rm_batch_size} must be divisible by the {world} processes")
    fu.seed_everything(cfg.seed, per_rank=False)
    os.makedirs(cfg.out_dir, exist_ok=True)
    fu.write_json(os.path.join(cfg.out_dir, "train_config.json"), asdict(cfg))
    rm_path = cfg.rm or os.path.join(cfg.out_dir, "rm")
    if cfg.stage in ("rm", "all"):
        rm_path = train_rm(cfg, device)
        if cfg.stage == "rm":
            fu.cleanup()
            return json.load(open(os.path.join(rm_path, "gvm_config.json")))
    if not os.path.exists(os.path.join(rm_path, "gvm_config.json")):
        sys.exit(f"ppo_baseline.py: no reward model at {rm_path}; run `python ppo_baseline.py --stage rm` first")
    rm_summary = json.load(open(os.path.join(rm_path, "gvm_config.json")))
    ckpt = os.path.join(cfg.out_dir, "checkpoint")
    resume = cfg.resume and os.path.exists(os.path.join(ckpt, "trainer_state.pt"))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if fu.rank() == 0 and os.path.exists(metrics_path) and not resume:
        os.remove(metrics_path)

    # models: trained policy and critic (PPO only: the critic), frozen reference and reward model
    policy, tok = load_policy(ckpt if resume else cfg.policy, device)
    ref, _ = load_policy(cfg.policy, device)
    rm, _, _ = load_gvm(rm_path, device)
    critic, _, _ = load_gvm(os.path.join(ckpt, "critic") if resume else rm_path, device)  # PPO only
    for frozen in (ref, rm):
        frozen.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        critic.backbone.gradient_checkpointing_enable()
    policy, ref, rm, critic = (fu.shard(m, device) for m in (policy, ref, rm, critic))
    policy.train()
    critic.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)  # PPO only

    # prompts: each rank reads its own shard
    my_texts, my_prompts, eval_prompts, builtin = load_prompts(cfg, tok, data.TruncationStats())
    data.check_context(max(map(len, my_prompts)) + cfg.max_new_tokens, policy.config, "prompt + max_new_tokens")

    state = {"step": 0, "kl_beta": cfg.kl_beta, "opt_step": 0, "before": None}
    if resume:
        st = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False) if fu.rank() == 0 else {}
        osd, critic_osd = st.pop("optimizer", {}), st.pop("critic_optimizer", {})  # stay on rank 0 (see dvpo.py)
        state.update(fu.broadcast_object(st))  # step, KL β
        fu.load_full_optim_state_dict(policy, opt, osd)
        fu.load_full_optim_state_dict(critic, critic_opt, critic_osd)
        trim_metrics(metrics_path, state["step"])
        fu.print0(f"resumed from {ckpt} at step {state['step']}")
    if state["before"] is None:
        state["before"] = evaluate(policy, ref, tok, eval_prompts, cfg, device, builtin)
    fu.print0("before: " + " | ".join(f"{k} {v:.4f}" for k, v in state["before"].items()))

    per_rank, mb_rank = cfg.batch_size // world, cfg.minibatch_size // world
    micro = min(cfg.micro_batch_size, mb_rank)
    t_start = time.time()
    bar = tqdm(range(state["step"], cfg.steps), desc="ppo", disable=fu.rank() != 0,
               initial=state["step"], total=cfg.steps)
    for step in bar:
        t0 = time.time()
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + fu.rank())
        idx = [(step * per_rank + i) % len(my_prompts) for i in range(per_rank)]

        # 1. rollout
        batch = rollout(policy, [my_prompts[i] for i in idx], tok, cfg.max_new_tokens, cfg.temperature, cfg.top_p, gen, device)
        t_gen = time.time() - t0
        T = batch["response"].shape[1]
        mask = data.response_mask(batch["response_len"], T)  # (B, T)

        # 2. frozen forwards, once per rollout batch: policy, reference, reward model, critic (PPO only)
        old_logp = frozen_logprobs(policy, batch, T, cfg.temperature)
        ref_logp = frozen_logprobs(ref, batch, T, cfg.temperature)
        with torch.inference_mode():
            score = terminal(*value_chain(rm(batch["input_ids"], batch["attention_mask"]).float(),
                                          batch["prompt_len"], batch["response_len"])).clone()  # r(x, y), (B,)
            fu.reshard(rm)
        with torch.no_grad():  # the critic is trained: no_grad, not inference_mode (see dvpo.frozen_logprobs)
            old_values = critic_values(critic, batch, T) * mask  # V_t = w_{t-1}
            fu.reshard(critic)

        # 3. KL penalty as per-token reward, then GAE with the critic; returns for the value loss
        kl = (old_logp - ref_logp) * mask  # k1 estimator
        r_kl = -state["kl_beta"] * kl
        adv_raw = ppo_advantages(old_values, score, r_kl, mask, cfg.gamma, cfg.lam)
        returns = (adv_raw + old_values) * mask
        adv = masked_batch_norm(adv_raw, mask)
        t_score = time.time() - t0 - t_gen

        # 4. PPO epochs × minibatches × micro-batches: policy loss, plus the critic's value loss (PPO only)
        stats = {"clipfrac": [], "approx_kl": [], "entropy": [], "grad_norm": [], "value_loss": [], "critic_grad_norm": []}
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(per_rank, generator=torch.Generator().manual_seed(step * 31 + epoch))
            for mb in range(0, per_rank, mb_rank):
                mb_idx = perm[mb:mb + mb_rank]
                n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone()).item()
                lr_now = lr_at(state["opt_step"], cfg.steps * cfg.ppo_epochs * (per_rank // mb_rank), cfg.warmup_steps, 1.0)
                for o, base in ((opt, cfg.lr), (critic_opt, cfg.critic_lr)):
                    for g in o.param_groups:
                        g["lr"] = base * lr_now
                opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                for mi in range(0, mb_rank, micro):
                    i = mb_idx[mi:mi + micro].to(device)
                    sub = {k: batch[k][i] for k in ("input_ids", "attention_mask", "prompt_len", "response_len")}
                    logp, entropy = data.response_logprobs(policy, sub, T, cfg.temperature)
                    loss, s = ppo_clip_loss(logp, old_logp[i], adv[i], mask[i], cfg.clip_eps, n_tokens)
                    (loss * world).backward()  # FSDP averages gradients over ranks: undo it
                    values = critic_values(critic, sub, T)
                    vloss = value_loss_clipped(values, old_values[i], returns[i], mask[i], cfg.value_clip, n_tokens)
                    (vloss * world).backward()
                    stats["clipfrac"].append(s["clipfrac"])
                    stats["approx_kl"].append(s["approx_kl"])
                    stats["entropy"].append(masked_mean(entropy.detach(), mask[i]).item())
                    stats["value_loss"].append(vloss.item() * world)
                stats["grad_norm"].append(fu.grad_norm_clip(policy, cfg.grad_clip))
                stats["critic_grad_norm"].append(fu.grad_norm_clip(critic, cfg.grad_clip))
                opt.step()
                critic_opt.step()
                state["opt_step"] += 1

        # 5. bookkeeping: KL controller, logs, checkpoint
        seq_kl = kl.sum(1).mean().item()
        if cfg.kl_target > 0:
            state["kl_beta"] = kl_controller(state["kl_beta"], fu.reduce_metrics({"kl": seq_kl}, device)["kl"],
                                             cfg.kl_target, cfg.batch_size, cfg.kl_horizon)
        state["step"] = step + 1
        dt = time.time() - t0
        m = {"rm/score": score.mean().item(), "critic/value_prompt": old_values[:, 0].mean().item(),
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
        bar.set_postfix(gold=f"{m.get('gold_reward', float('nan')):.3f}", rm=f"{m['rm/score']:.3f}",
                        kl=f"{m['kl']:.3f}", vloss=f"{m['value_loss']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(policy, critic, opt, critic_opt, tok, state, ckpt)
        if cfg.stop_after and step + 1 >= cfg.stop_after:
            save_checkpoint(policy, critic, opt, critic_opt, tok, state, ckpt)
            fu.print0(f"stopped after step {step + 1} (--stop_after); continue with --resume")
            fu.cleanup()
            return {"train/steps": state["step"]}

    # final evaluation and outputs
    after = evaluate(policy, ref, tok, eval_prompts, cfg, device, builtin)
    before = state["before"]
    summary = {"train/steps": state["step"], "train/seconds": time.time() - t_start,
               "rm/pairwise_accuracy": rm_summary.get("rm/pairwise_accuracy", float("nan")),
               "eval/kl_to_ref": after["kl_to_ref"], "eval/response_len": after["response_len"]}
    if builtin:
        summary.update(gold_summary(before, after))
    save_checkpoint(policy, critic, opt, critic_opt, tok, state, ckpt)
    fu.save_hf(policy, tok, cfg.out_dir)
    backbone, head = split_gvm_state(fu.full_state_dict(critic))  # the critic, loadable with gvm.load_gvm
    fu.save_hf(critic.backbone, tok, os.path.join(cfg.out_dir, "critic"), state_dict=backbone,
               extra={"value_head.safetensors": head, "gvm_config.json": {"reward": "ppo_critic", "gamma": cfg.gamma, "lam": cfg.lam, "tau_k": 0}})
    fu.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    fu.print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    fu.cleanup()
    return summary


def save_checkpoint(policy, critic, opt, critic_opt, tok, state: dict, path: str):
    """Policy (HF format) + critic (GVM format, in critic/) + both optimizers + step + KL β, in one
    folder swapped in atomically, so policy and critic always come from the same step."""
    p_sd, c_sd = fu.full_state_dict(policy), fu.full_state_dict(critic)
    p_opt, c_opt = fu.full_optim_state_dict(policy, opt), fu.full_optim_state_dict(critic, critic_opt)
    with fu.staged_dir(path, replace_dir=True) as tmp:
        if tmp is not None:
            fu.write_hf(policy, tok, tmp, p_sd, {"trainer_state.pt": {**state, "optimizer": p_opt, "critic_optimizer": c_opt}})
            backbone, head = split_gvm_state(c_sd)
            fu.write_hf(critic.backbone, tok, os.path.join(tmp, "critic"), backbone,
                        {"value_head.safetensors": head, "gvm_config.json": {"reward": "ppo_critic", "tau_k": 0}})
    fu.barrier()


if __name__ == "__main__":
    try:
        main(fu.parse_config(Config))
    except data.DataError as e:  # bad input: one clear line, no traceback
        sys.exit(f"ppo_baseline.py: {e}")
