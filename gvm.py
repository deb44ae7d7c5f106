"""gvm.py — the Global Value Model (GVM): a causal-LM backbone + a linear value head, trained
offline with TD(λ) on preference data, then frozen for DVPO (arXiv:2502.16944v1 §3.2, Eq. (1);
docs/algorithm.md §1, §2, §8).

  1. u_i = head(h_i): one scalar per position; the value chain of a response is w_k = u_{P-1+k},
     k = 0..T (w_0 = V(prompt), w_k = Q(s_k, a_k), w_T ≈ r(x, y)).
  2. Terminal reward R: +1 for a chosen response, -1 for a rejected one (or a given score).
  3. λ-return targets from the same network without gradient:
         G_T = R,   G_k = γ·((1-λ)·w_{k+1} + λ·G_{k+1})   (λ = 0: Eq. 1's TD(0); λ = 1: Monte Carlo)
  4. Loss: ½ · mean over valid chain entries of the global batch of (w_k - G_k)².
  5. τ conditioning (--tau_k K): the input is [τ] ⊕ x ⊕ y, τ = K (prompt, response) pairs of the same
     policy on other prompts; τ positions are never in the chain, so never in a loss or statistic.
  6. Evaluation (paper Table 4): held-out pairwise accuracy of w_T(chosen) > w_T(rejected), and of
     the chain's mean and P1..P99 percentiles; on the built-in task also the gold reward's own
     accuracy on the same noisy labels (the ceiling).
  7. Scale (docs/algorithm.md §7): the mean and std of w_T over every held-out response, stored in
     gvm_config.json; dvpo.py divides the chain by that std, so that β means the same for any GVM.
  8. Return-to-go (built-in task, §11): how well w_{k-1} tracks the true expected gold reward of
     completing a prefix y_<k with the sampler that wrote it (Monte Carlo): rank correlation.

Launch:
  python gvm.py                                  # built-in task: pairs sampled from out/sft -> out/gvm
  python gvm.py --data prefs.jsonl --model <sft path> --out_dir out/gvm_real
  torchrun --nproc_per_node 8 gvm.py --data prefs.jsonl --model <sft path>
  python gvm.py --explain --gvm out/gvm --prompt "52817:" --response "12578"
  python gvm.py --explain --gvm out/gvm_real --messages '[{"role": "user", "content": "Hi"}]' --response "Hello!"
  (chat template; a plain --prompt is one user message when the GVM was trained on chat prompts)
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM
from tqdm import tqdm

import checkpoint
import data
import fsdp_utils as fu
import task
import train_utils as tu

GVM_CONFIG = "gvm_config.json"  # written beside the backbone: γ, λ, τ settings, reward kind, value scale


@dataclass
class Config:
    model: str = "out/sft"  # backbone initialization: the SFT policy (hub id or path)
    data: str = ""  # preference or scored JSONL/JSON file; empty = built-in task sampled from --model
    data_kind: str = "preference"  # preference ({prompt, chosen, rejected} ...) or scored ({prompt, response, score})
    eval_data: str = ""  # held-out file of the same kind; empty = split eval_frac off --data
    eval_frac: float = 0.05
    normalize_scores: bool = True  # scored data: R = (score - mean) / std over the training set
    out_dir: str = "out/gvm"
    gamma: float = 1.0  # discount
    lam: float = 0.95  # TD(λ) mixing; 0 = TD(0) as in Eq. (1), 1 = Monte Carlo
    tau_k: int = 0  # number of same-policy trajectories τ in the context (0 = no conditioning)
    tau_prompt_len: int = 64  # each τ prompt is cut to this many tokens (from the left)
    tau_response_len: int = 64  # each τ response is cut to this many tokens (from the right)
    epochs: int = 2
    batch_size: int = 32  # pairs (or scored rows) per optimizer step, global
    lr: float = 3e-4  # use ~2e-6 (paper App. A) for real models
    warmup_steps: int = 20
    grad_clip: float = 1.0
    max_prompt_len: int = 512
    max_response_len: int = 512
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    # built-in task: pairs sampled from --model by each sampler
    builtin_prompts: int = 16000  # train prompts per sampler (each gives one pair)
    builtin_eval_prompts: int = 1000  # held-out prompts per sampler
    builtin_samplers: str = "T1.0,T1.5"  # samplers (task.parse_sampler), one `policy` each; "T1.0,T1.0+late0.5":
    #                                       two that are alike early and differ late (the case τ is for)
    rtg_prompts: int = 256  # built-in task: held-out prompts per sampler of the return-to-go metric (0 = off)
    rtg_completions: int = 16  # Monte Carlo completions per prefix
    bt_temperature: float = 0.1  # Bradley-Terry label noise: P(a > b) = sigmoid((g_a - g_b) / t)
    # explain mode
    explain: bool = False  # print per-token values of one response instead of training
    gvm: str = "out/gvm"  # explain: the trained GVM folder
    prompt: str = ""  # explain: the prompt text (a user message when the GVM was trained on chat prompts)
    messages: str = ""  # explain: the prompt as a JSON list of {role, content} messages (chat template)
    response: str = ""
    log_every: int = 10
    seed: int = 0
    device: str = "auto"


def load_gvm(path: str):
    """(value model, tokenizer, gvm_config) of a trained GVM folder."""
    return tu.load_value_model(path, GVM_CONFIG, "train a GVM with `python gvm.py`")


# ----------------------------------------------------------------------------------------------
# Pure functions: λ-returns and the TD loss (docs/algorithm.md §2)

def td_lambda_targets(w: torch.Tensor, R: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """λ-returns over the value chain (docs/algorithm.md §2; arXiv:2502.16944v1 Eq. (1) is λ = 0).
    w: (B, K) chain values (no grad), R: (B,) terminal reward, mask: (B, K) valid entries, each
    row valid on a prefix 0..T_b. Returns G (B, K), zero where mask == 0:
        G_{T_b} = R_b,   G_k = γ((1-λ) w_{k+1} + λ G_{k+1})  for k < T_b."""
    B, K = w.shape
    last = mask.sum(1).long() - 1  # (B,) index T_b of the terminal entry
    G = torch.zeros_like(w)
    nxt = torch.zeros(B, dtype=w.dtype, device=w.device)  # G_{k+1}
    for k in reversed(range(K)):  # vectorized over rows, a loop over time
        w_next = w[:, k + 1] if k + 1 < K else torch.zeros_like(nxt)
        boot = gamma * ((1 - lam) * w_next + lam * nxt)
        G[:, k] = torch.where(k == last, R.to(w.dtype), boot) * mask[:, k]
        nxt = G[:, k]
    return G


def gvm_loss(w: torch.Tensor, G: torch.Tensor, mask: torch.Tensor, n_valid: float) -> torch.Tensor:
    """½ Σ mask·(w - G)² / n_valid: with n_valid the valid-entry count of the global batch, this is
    the global token mean. (Under FSDP gradients are averaged over ranks: scale by world size.)"""
    return 0.5 * (mask * (w - G) ** 2).sum() / n_valid


def rtg_metrics(values: torch.Tensor, returns: torch.Tensor) -> dict:
    """How well values (N,) track Monte Carlo returns-to-go (N,) (docs/algorithm.md §11): Spearman's
    rank correlation, and the mean squared error left after the best affine map a·v + b of the values
    onto the returns (scale-free: the GVM predicts the ±1 preference target, not the gold reward)."""
    v, g = values.double(), returns.double()
    X = torch.stack([v, torch.ones_like(v)], 1)  # (N, 2)
    coef = torch.linalg.lstsq(X, g[:, None]).solution  # (2, 1): least-squares a, b
    return {"corr": tu.rank_correlation(v, g), "mse": (g - (X @ coef).squeeze(1)).square().mean().item()}


# ----------------------------------------------------------------------------------------------
# Data: sequences with terminal rewards (and τ), batches

def encode_rows(rows: list[dict], kind: str, tok, cfg: Config, trunc: data.TruncationStats) -> list[dict]:
    """Rows -> token ids. Preference: {prompt, chosen, rejected, policy} (R = +1 / -1);
    scored: {prompt, response, score, policy}."""
    out = []
    for r in rows:
        e = {"prompt": data.encode_prompt(tok, r["prompt"], cfg.max_prompt_len, trunc), "policy": r.get("policy")}
        keys = ("chosen", "rejected") if kind == "preference" else ("response",)
        for k in keys:
            e[k] = data.encode_response(tok, r[k], cfg.max_response_len, trunc)
        if kind == "scored":
            e["score"] = r["score"]
        out.append(e)
    return out


def tau_pools(examples: list[dict], kind: str) -> dict:
    """policy -> list of (example index, prompt ids, response ids), τ candidates per policy. Both
    responses of a pair are candidates: τ is never chosen by label."""
    pools = {}
    for i, e in enumerate(examples):
        for k in (("chosen", "rejected") if kind == "preference" else ("response",)):
            pools.setdefault(e["policy"], []).append((i, e["prompt"], e[k]))
    return pools


def draw_tau(i: int, e: dict, pools: dict, K: int, rng: random.Random, cfg: Config) -> list[int]:
    """τ prefix for example i: K trajectories of the same policy from other prompts."""
    if K == 0:
        return []
    pool = pools[e["policy"]]
    picks = []
    while len(picks) < K:  # rejection sampling: other examples with a different prompt
        j, p, r = pool[rng.randrange(len(pool))]
        if j != i and p != e["prompt"]:
            picks.append((p, r))
    return data.tau_prefix(picks, cfg.tau_prompt_len, cfg.tau_response_len)


def make_batch(examples: list[dict], idx: list[int], kind: str, pools: dict, cfg: Config, tau_key: tuple,
               pad_id: int, R_of):
    """Sequences [τ] ⊕ x ⊕ y for examples idx (two per pair: chosen then rejected), with terminal
    rewards R (B,). The same τ for both responses of a pair; example i draws its τ from the stream
    (seed, *tau_key, i), so the draws do not depend on how rows are split over ranks."""
    prompts, responses, R = [], [], []
    for i in idx:
        e = examples[i]
        tau = draw_tau(i, e, pools, cfg.tau_k, tu.python_rng(cfg.seed, *tau_key, i), cfg)
        keys = ("chosen", "rejected") if kind == "preference" else ("response",)
        for k in keys:
            prompts.append(tau + e["prompt"])
            responses.append(e[k])
            R.append(R_of(e, k))
    batch = data.collate_right(prompts, responses, pad_id)
    batch["R"] = torch.tensor(R, dtype=torch.float32)
    return batch


# ----------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, examples, kind, pools, cfg: Config, pad_id, device, R_of, batch_size: int = 128) -> dict:
    """Held-out TD loss and (preference data) pairwise accuracy with w_T, the chain mean and chain
    percentiles, overall and per sampling policy. Replicated on every rank (held-out sets are
    small), so no collective is skipped."""
    model.eval()
    finals, means, pcts, td = [], [], {q: [] for q in (1, 5, 10, 90, 95, 99)}, [0.0, 0.0]
    for s in range(0, len(examples), batch_size):
        idx = list(range(s, min(s + batch_size, len(examples))))
        batch = make_batch(examples, idx, kind, pools, cfg, ("gvm/eval_tau",), pad_id, R_of)  # the same every time
        batch = {k: v.to(device) for k, v in batch.items()}
        u = model(batch["input_ids"], batch["attention_mask"]).float()
        w, mask = data.value_chain(u, batch["prompt_len"], batch["response_len"])
        G = td_lambda_targets(w, batch["R"], mask, cfg.gamma, cfg.lam)
        td[0] += 0.5 * (mask * (w - G) ** 2).sum().item()
        td[1] += mask.sum().item()
        last = mask.sum(1).long() - 1
        finals.append(w.gather(1, last[:, None]).squeeze(1).cpu())
        means.append(((w * mask).sum(1) / mask.sum(1)).cpu())
        for q in pcts:
            pcts[q].append(torch.stack([torch.quantile(w[b, :last[b] + 1], q / 100) for b in range(len(w))]).cpu())
    model.train()
    w_T = torch.cat(finals).double()  # every held-out response (chosen and rejected alike)
    out = {"eval/td_loss": td[0] / td[1], "eval/value_mean": w_T.mean().item(),
           "eval/value_std": w_T.std(unbiased=False).item()}  # the scale RL divides by (docs/algorithm.md §7)
    if kind == "preference":  # rows alternate chosen, rejected
        table = {"final": torch.cat(finals), "mean": torch.cat(means)}
        table.update({f"P{q}": torch.cat(v) for q, v in pcts.items()})
        acc = {name: tu.pairwise_accuracy(v[0::2], v[1::2]) for name, v in table.items()}
        out["eval/pairwise_accuracy"] = acc["final"]
        out["eval/pairwise_accuracy_table"] = acc
        for pol in sorted({e["policy"] for e in examples if e["policy"] is not None}):
            sel = torch.tensor([e["policy"] == pol for e in examples])
            out[f"eval/pairwise_accuracy/{pol}"] = tu.pairwise_accuracy(table["final"][0::2][sel],
                                                                     table["final"][1::2][sel])
        out["eval/value_chosen_mean"] = table["final"][0::2].mean().item()
        out["eval/value_rejected_mean"] = table["final"][1::2].mean().item()
    return out


RTG_POSITIONS = {"early": 1 / 6, "middle": 1 / 2, "late": 5 / 6}  # where in the response the prefix ends


@torch.no_grad()
def return_to_go(model, policy, tok, cfg: Config, device) -> dict:
    """The return-to-go metric (built-in task, docs/algorithm.md §11). For cfg.rtg_prompts held-out
    prompts and each sampler: one response y from the sampler; in it an early, a middle and a late
    state s_k = x ⊕ y_<k (k = 1 + floor(f·T), f = 1/6, 1/2, 5/6, T = |y| + EOS); the true value of
    s_k for that sampler estimated by Monte Carlo (the mean gold reward of cfg.rtg_completions
    completions of s_k by the same sampler); the GVM's value of s_k, w_{k-1}, read on [τ] ⊕ x ⊕ y
    with τ = K responses of the same sampler to other prompts. rtg_metrics overall, per sampler,
    per position."""
    model.eval()
    prompts = task.builtin_prompts(cfg.rtg_prompts, "eval", seed=tu.seed_for(cfg.seed, "rtg/prompts"))
    gen, slips = tu.torch_rng(cfg.seed, "rtg", device=device), tu.python_rng(cfg.seed, "rtg/slips")
    values, returns, tags = [], [], []
    for spec in cfg.builtin_samplers.split(","):
        ys = task.sample_builtin(policy, tok, prompts, spec, gen, slips, device=device)
        enc = [(data.encode_prompt(tok, p), data.encode_response(tok, y)) for p, y in zip(prompts, ys)]
        rng = tu.python_rng(cfg.seed, "rtg/tau", spec)
        tau = [data.tau_prefix([enc[j] for j in rng.sample([j for j in range(len(enc)) if prompts[j] != p],
                                                           cfg.tau_k)], cfg.tau_prompt_len, cfg.tau_response_len)
               for p in prompts]
        batch = data.collate_right([t + e[0] for t, e in zip(tau, enc)], [e[1] for e in enc], tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        w, _ = data.value_chain(model(batch["input_ids"], batch["attention_mask"]).float(), batch["prompt_len"],
                                batch["response_len"])
        cases = [(i, 1 + int(f * len(enc[i][1])), pos) for i in range(len(prompts)) for pos, f in RTG_POSITIONS.items()]
        values += [w[i, k - 1].item() for i, k, _ in cases]  # V(s_k) = w_{k-1}
        returns += task.mc_returns(policy, tok, prompts, ys, [c[:2] for c in cases], spec, cfg.rtg_completions, gen,
                                   slips, device).tolist()
        tags += [(f"sft@{spec}", pos) for _, _, pos in cases]
    model.train()
    values, returns = torch.tensor(values), torch.tensor(returns)
    out = {f"eval/rtg_{k}": v for k, v in rtg_metrics(values, returns).items()}
    groups = sorted({t[0] for t in tags}) + list(RTG_POSITIONS)
    for g in groups:
        sel = torch.tensor([g in t for t in tags])
        out.update({f"eval/rtg_{k}/{g}": v for k, v in rtg_metrics(values[sel], returns[sel]).items()})
    return out


# ----------------------------------------------------------------------------------------------
# Explain: per-token values (paper Figure 4)

def explain_prompt(cfg: Config, gcfg: dict):
    """The prompt to explain: --messages (a JSON list of {role, content}) as given; a plain --prompt as
    one user message when the GVM was trained on chat prompts (gvm_config chat_prompts), so it is
    encoded as training encoded its prompts; otherwise the text as is."""
    if cfg.messages:
        try:
            return data.parse_prompt({"prompt": json.loads(cfg.messages)}, "--messages")["prompt"]
        except json.JSONDecodeError as e:
            raise data.DataError(f"--messages: invalid JSON: {e.msg}") from None
    if not cfg.prompt:
        raise data.DataError("--explain needs --prompt or --messages (and --response)")
    return [{"role": "user", "content": cfg.prompt}] if gcfg.get("chat_prompts") else cfg.prompt


def explain(cfg: Config):
    device = fu.setup(cfg.device)
    model, tok, gcfg = load_gvm(cfg.gvm)
    model.to(device).eval()
    if gcfg.get("tau_k", 0):
        print(f"note: this GVM was trained with tau_k={gcfg['tau_k']}; explaining without τ context")
    prompt = explain_prompt(cfg, gcfg)
    p, r = data.encode_prompt(tok, prompt), data.encode_response(tok, cfg.response)
    batch = {k: v.to(device) for k, v in data.collate_right([p], [r], tok.pad_token_id).items()}
    with torch.inference_mode():
        u = model(batch["input_ids"], batch["attention_mask"]).float()
        w, _ = data.value_chain(u, batch["prompt_len"], batch["response_len"])
    w = w[0].tolist()
    how = "plain text" if isinstance(prompt, str) else "chat template" if tok.chat_template else \
        "role: content lines, no chat template"
    if isinstance(prompt, list) and not cfg.messages:
        how += ", --prompt as a user message: this GVM was trained on chat prompts"
    print(f"prompt ({how}), the exact {len(p)} tokens scored: {tok.convert_ids_to_tokens(p)}")
    print(f"w_0 = V(prompt) = {w[0]:+.3f}, read at the last prompt token")
    print(f"{'t':>3}  {'token':<12} {'w_t':>8} {'w_t - w_t-1':>12}")
    for t, tid in enumerate(r, 1):
        bar = "+" * round(max(w[t] - w[t - 1], 0) * 20) or "-" * round(max(w[t - 1] - w[t], 0) * 20)
        print(f"{t:>3}  {tok.convert_ids_to_tokens(tid)!r:<12} {w[t]:>+8.3f} {w[t] - w[t - 1]:>+12.3f}  {bar}")
    print(f"terminal value w_T = {w[-1]:+.3f} (the GVM's estimate of the response's reward)")
    if not isinstance(prompt, str) or not prompt.endswith(":") or not prompt[:-1].isdigit():
        return
    print(f"gold reward (built-in task) = {task.gold_reward(cfg.prompt, cfg.response):.3f}")


# ----------------------------------------------------------------------------------------------
# main: the recipe

def main(cfg: Config):
    if cfg.explain:
        return explain(cfg)
    device = fu.setup(cfg.device)
    if cfg.batch_size % fu.world():  # every rank needs rows in every batch
        sys.exit(f"gvm.py: --batch_size {cfg.batch_size} must be divisible by the {fu.world()} processes")
    tu.seed_everything(cfg.seed)  # the same on every rank
    metrics_path = tu.start_metrics(cfg.out_dir, cfg)
    if not os.path.exists(cfg.model) and not cfg.data:
        sys.exit(f"gvm.py: no SFT policy at {cfg.model!r}; run `python sft.py` first (or pass --model)")
    tok = tu.load_tokenizer(cfg.model)

    # 1. data: preference pairs (R = ±1) or scored rows (R = score), a held-out split, τ pools
    kind, train_rows, eval_rows = tu.load_value_rows(cfg, tok, device, "gvm.py")
    trunc = data.TruncationStats()
    train, held = encode_rows(train_rows, kind, tok, cfg, trunc), encode_rows(eval_rows, kind, tok, cfg, trunc)
    fu.print0(f"{len(train)} training and {len(held)} held-out {kind} rows; {trunc.summary()}")
    score_mu, score_sd = 0.0, 1.0
    if kind == "scored" and cfg.normalize_scores:
        scores = torch.tensor([e["score"] for e in train], dtype=torch.float64)
        score_mu, score_sd = scores.mean().item(), max(scores.std().item(), 1e-8) if len(scores) > 1 else 1.0
    R_of = (lambda e, k: 1.0 if k == "chosen" else -1.0) if kind == "preference" else \
        (lambda e, k: (e["score"] - score_mu) / score_sd)
    pools, held_pools = tau_pools(train, kind), tau_pools(held, kind)
    if cfg.tau_k:
        for name, p in list(pools.items()) + list(held_pools.items()):
            if len({tuple(x[1]) for x in p}) <= cfg.tau_k:
                sys.exit(f"gvm.py: policy {name!r} has too few distinct prompts for --tau_k {cfg.tau_k}")

    # 2. model: SFT backbone + zero-initialised value head, sharded under torchrun
    model = tu.new_value_model(cfg.model, device)
    prompt_max = max(len(e["prompt"]) for e in train + held)
    response_max = max(len(e[k]) for e in train + held for k in e if k in ("chosen", "rejected", "response"))
    tau_item = min(cfg.tau_prompt_len, prompt_max) + min(cfg.tau_response_len, response_max)  # its longest
    data.check_context(prompt_max + response_max + cfg.tau_k * tau_item, model.backbone.config,
                       "τ + prompt + response")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = len(train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if total == 0:
        sys.exit(f"gvm.py: {len(train)} training rows is fewer than one batch of {cfg.batch_size}")
    t0, step = time.time(), 0
    bar = tqdm(total=total, desc="gvm", disable=fu.rank() != 0)
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        tu.python_rng(cfg.seed, "gvm/order", epoch).shuffle(order)  # the same order on every rank
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size][fu.rank()::fu.world()]  # this rank's rows
            batch = make_batch(train, idx, kind, pools, cfg, ("gvm/tau", step), tok.pad_token_id, R_of)
            batch = {k: v.to(device) for k, v in batch.items()}

            # 3. TD(λ): one forward; the targets are its detached values (the "no-grad pass of the
            #    same network" of docs/algorithm.md §2: same weights, same batch, no dropout -> same numbers)
            u = model(batch["input_ids"], batch["attention_mask"]).float()  # (B, L)
            w, mask = data.value_chain(u, batch["prompt_len"], batch["response_len"])  # (B, T+1)
            G = td_lambda_targets(w.detach(), batch["R"], mask, cfg.gamma, cfg.lam)  # Eq. (1), λ-return
            n_valid = fu.all_reduce_sum(mask.sum().detach().clone()).item()  # global count of chain entries
            loss = gvm_loss(w, G, mask, n_valid) * fu.world()  # FSDP averages grads over ranks

            for g in opt.param_groups:
                g["lr"] = tu.lr_at(step, total, cfg.warmup_steps, cfg.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = fu.grad_norm_clip(model, cfg.grad_clip)
            opt.step()

            if step % cfg.log_every == 0 or step == total - 1:
                m = fu.reduce_metrics({"train/td_loss": loss.item()}, device)  # mean of rank shares × world = sum
                m.update({"step": step, "epoch": epoch, "train/grad_norm": gnorm,
                          "train/lr": opt.param_groups[0]["lr"], "time/seconds": time.time() - t0})
                fu.append_jsonl(metrics_path, m)
                bar.set_postfix(td_loss=f"{m['train/td_loss']:.4f}")
            bar.update(1)
            step += 1
    bar.close()

    # 4. evaluate on held-out rows; compare with the gold reward's own accuracy (built-in task)
    ev = evaluate(model, held, kind, held_pools, cfg, tok.pad_token_id, device, R_of)
    summary = {"train/pairs" if kind == "preference" else "train/rows": len(train),
               "eval/pairs" if kind == "preference" else "eval/rows": len(held),
               "train/steps": total, "train/seconds": time.time() - t0, "tau_k": cfg.tau_k, **ev}
    if not cfg.data and cfg.rtg_prompts > 0:  # built-in task: does the GVM track the true return-to-go?
        policy = AutoModelForCausalLM.from_pretrained(cfg.model).to(device).eval()
        summary.update(return_to_go(model, policy, tok, cfg, device))
        del policy
    if "gold_chosen" in eval_rows[0]:  # built-in task: the ceiling, the gold reward's own accuracy
        summary.update(task.gold_accuracy(eval_rows, tu.pairwise_accuracy))
    gcfg = {"gamma": cfg.gamma, "lam": cfg.lam, "tau_k": cfg.tau_k, "tau_prompt_len": cfg.tau_prompt_len,
            "tau_response_len": cfg.tau_response_len, "reward": kind, "score_mean": score_mu, "score_std": score_sd,
            "chat_prompts": any(isinstance(r["prompt"], list) for r in train_rows),  # --explain encodes alike
            # fixed at training time, so the RL reward is stationary: dvpo.py divides the chain by value_std
            "value_mean": ev["eval/value_mean"], "value_std": ev["eval/value_std"]}
    checkpoint.save_value_model(model, tok, cfg.out_dir, GVM_CONFIG, gcfg)
    tu.finish(cfg.out_dir, summary)
    if "eval/pairwise_accuracy_table" in summary:
        fu.print0("held-out pairwise accuracy by statistic (paper Table 4): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in summary["eval/pairwise_accuracy_table"].items()))
    if "eval/rtg_corr" in summary:
        fu.print0("return-to-go rank correlation (value of a prefix vs its Monte Carlo return): " +
                  ", ".join(f"{k[len('eval/rtg_corr/'):] or 'all'} {v:.3f}" for k, v in summary.items()
                            if k.startswith("eval/rtg_corr")))
    fu.print0(f"saved to {cfg.out_dir}")
    fu.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main(fu.parse_config(Config))
    except data.DataError as e:  # bad input: one clear line, no traceback
        sys.exit(f"gvm.py: {e}")
