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
import evaluation
import fsdp_utils as fu
import model
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
    micro_batch_size: int = 32  # pairs (or scored rows) per forward/backward on one rank; also evaluation
    gradient_checkpointing: bool = False
    grad_sync: str = "every"  # every: reduce-scatter each micro-batch's gradients | last: once per step (faster,
    #                            but an unsharded fp32 gradient of the trained model on every rank meanwhile)
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
    prompt: str = ""  # explain: the prompt text (a user message when the model was trained on chat prompts)
    messages: str = ""  # explain: the prompt as a JSON list of {role, content} messages (chat template)
    response: str = ""
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (this rank's GPU under torchrun)
    dist_timeout_min: float = 60  # how long a collective may wait for the other ranks


def load_gvm(path: str, device="cpu", dtype=torch.float32, frozen: bool = False):
    """(value model, tokenizer, gvm_config) of a trained GVM folder (model.load_value_model)."""
    return model.load_value_model(path, GVM_CONFIG, "train a GVM with `python gvm.py`", device, dtype, frozen)


# ----------------------------------------------------------------------------------------------
# Pure functions: λ-returns and the TD loss (docs/algorithm.md §2)

def td_lambda_targets(w: torch.Tensor, R: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """λ-returns over the value chain (docs/algorithm.md §2; arXiv:2502.16944v1 Eq. (1) is λ = 0).
    w: (B, T+1) chain values (no grad), R: (B,) terminal reward, mask: (B, T+1) valid entries, each
    row valid on a prefix 0..T_b. Returns G (B, T+1), zero where mask == 0:
        G_{T_b} = R_b,   G_k = γ((1-λ) w_{k+1} + λ G_{k+1})  for k < T_b."""
    B, N = w.shape  # N = T+1 chain entries
    last = model.last_index(mask)  # (B,) index T_b of the terminal entry
    G = torch.zeros_like(w)
    nxt = torch.zeros(B, dtype=w.dtype, device=w.device)  # G_{k+1}
    for k in reversed(range(N)):  # vectorized over rows, a loop over time
        w_next = w[:, k + 1] if k + 1 < N else torch.zeros_like(nxt)
        boot = gamma * ((1 - lam) * w_next + lam * nxt)
        G[:, k] = torch.where(k == last, R.to(w.dtype), boot) * mask[:, k]
        nxt = G[:, k]
    return G


def gvm_loss(w: torch.Tensor, G: torch.Tensor, mask: torch.Tensor, n_valid) -> torch.Tensor:
    """½ Σ mask·(w - G)² / n_valid over the chain, w, G, mask: (B, T+1) (G detached: a semi-gradient).
    Loss convention: this rank's share of the global mean, Σ_local / n_valid with n_valid the valid
    entries of the global batch (the caller backpropagates loss * world: DDP/FSDP average over ranks)."""
    return 0.5 * (mask * (w - G) ** 2).sum() / n_valid


# ----------------------------------------------------------------------------------------------
# Data: rows with terminal rewards (and τ), batches

def load_value_rows(cfg: Config, tok, device) -> tuple[str, list, list]:
    """(kind, training rows, held-out rows): from cfg.data (preference or scored) with cfg.eval_data or
    a split, or the built-in task's pairs sampled from cfg.model by each of cfg.builtin_samplers.
    Writes the exact rows used (pairs_train.jsonl, pairs_eval.jsonl), so that reward_model.py trains
    on the same pairs and split."""
    kind = cfg.data_kind
    if kind not in ("preference", "scored"):
        raise tu.ConfigError(f"--data_kind must be 'preference' or 'scored', got {cfg.data_kind!r}")
    if not cfg.data:
        kind = "preference"
        rows = None
        if fu.rank() == 0:  # sampled on rank 0 only (no other rank loads the policy), then broadcast
            policy = AutoModelForCausalLM.from_pretrained(cfg.model).to(device).eval()
            rows = task.builtin_pair_splits(policy, tok, cfg.builtin_samplers.split(","), cfg.builtin_prompts,
                                            cfg.builtin_eval_prompts, cfg.bt_temperature, cfg.seed, device)
            del policy
        rows = fu.broadcast_object(rows)
        train_rows, eval_rows = rows["train"], rows["eval"]
    else:
        train_rows, eval_rows = data.load_rows(cfg.data, cfg.eval_data, kind, cfg.skip_bad, cfg.eval_frac, cfg.seed)
    if not train_rows or not eval_rows:
        raise data.DataError(f"need training and held-out rows, got {len(train_rows)} and {len(eval_rows)} "
                             "(a file needs at least 2 rows to split, or pass --eval_data)")
    if fu.rank() == 0:
        for split, rs in (("train", train_rows), ("eval", eval_rows)):
            name = f"pairs_{split}.jsonl" if kind == "preference" else f"scored_{split}.jsonl"
            with open(os.path.join(cfg.out_dir, name), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rs)
    return kind, train_rows, eval_rows


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
# The step: one optimizer step of TD(λ) on this rank's rows of a global batch

def train_step(value_model, opt, examples: list[dict], idx: list[int], kind: str, pools: dict, cfg: Config, step: int,
               total: int, pad_id: int, R_of, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on examples idx, this rank's rows of the step's global batch: the learning rate,
    the TD(λ) loss in micro-batches (gradient accumulation), clipping, the optimizer step. Returns this
    rank's summed loss shares and the gradient norm before clipping (0-d tensors: no host sync)."""
    world = fu.world()
    keys = ("chosen", "rejected") if kind == "preference" else ("response",)
    micro = min(cfg.micro_batch_size, cfg.batch_size // world)
    n_local = torch.tensor(float(sum(len(examples[i][key]) + 1 for i in idx for key in keys)), device=device)
    n_valid = fu.all_reduce_sum(n_local)  # all-reduce: the chain entries of the step's global batch

    for g in opt.param_groups:
        g["lr"] = tu.lr_at(step, total, cfg.warmup_steps, cfg.lr)
    opt.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)  # Σ over micro-batches of this rank's loss shares
    for mi in range(0, len(idx), micro):
        fu.grad_sync(value_model, cfg.grad_sync == "every" or mi + micro >= len(idx))  # FSDP2 reduce-scatter
        batch = make_batch(examples, idx[mi:mi + micro], kind, pools, cfg, ("gvm/tau", step), pad_id, R_of)
        batch = {key: v.to(device) for key, v in batch.items()}

        # TD(λ): one forward; the targets are its detached values (the "no-grad pass of the same
        # network" of docs/algorithm.md §2: same weights, same batch, no dropout -> same numbers)
        u = value_model(batch["input_ids"], batch["attention_mask"])  # (B, L), fp32
        w, mask = model.value_chain(u, batch["prompt_len"], batch["response_len"])  # (B, T+1)
        G = td_lambda_targets(w.detach(), batch["R"], mask, cfg.gamma, cfg.lam)  # Eq. (1), λ-return
        loss = gvm_loss(w, G, mask, n_valid)
        (loss * world).backward()  # DDP/FSDP average gradients over ranks: undo it
        step_loss += loss.detach()
    gnorm = fu.grad_norm_clip(value_model, cfg.grad_clip)  # all-reduce under FSDP2
    opt.step()
    return step_loss, gnorm


# ----------------------------------------------------------------------------------------------
# Evaluation

PERCENTILES = (1, 5, 10, 90, 95, 99)  # per-token percentiles of the chain, scores of paper Table 4


@torch.no_grad()
def evaluate(value_model, examples, kind, pools, cfg: Config, pad_id, device, R_of) -> dict:
    """Held-out TD loss and (preference data) pairwise accuracy with w_T, the chain mean and chain
    percentiles, overall and per sampling policy. Each rank scores its strided share of the examples in
    micro-batches; the per-response results are all-gathered, so every rank returns the same numbers."""
    value_model.eval()
    per_example = {}  # example index -> [(w_T, chain mean, percentiles, Σ ½ (w - G)², chain entries) per response]
    k = 2 if kind == "preference" else 1  # responses per example, consecutive rows of a batch
    for idx in evaluation.shard_batches(len(examples), cfg.micro_batch_size):
        batch = make_batch(examples, idx or [0], kind, pools, cfg, ("gvm/eval_tau",), pad_id, R_of)  # same τ always
        batch = {key: v.to(device) for key, v in batch.items()}
        u = value_model(batch["input_ids"], batch["attention_mask"])  # (B, L), fp32
        w, mask = model.value_chain(u, batch["prompt_len"], batch["response_len"])
        G = td_lambda_targets(w, batch["R"], mask, cfg.gamma, cfg.lam)
        last = model.last_index(mask).tolist()  # CPU-GPU sync
        q = torch.tensor([q / 100 for q in PERCENTILES], device=w.device)
        pcts = torch.stack([torch.quantile(w[b, :last[b] + 1], q) for b in range(len(w))]).tolist()  # CPU-GPU sync
        rows = list(zip(model.terminal(w, mask).tolist(), ((w * mask).sum(1) / mask.sum(1)).tolist(), pcts,
                        (0.5 * mask * (w - G) ** 2).sum(1).tolist(), mask.sum(1).tolist()))  # CPU-GPU sync
        for j, i in enumerate(idx):  # (a dummy batch, idx == [], adds nothing)
            per_example[i] = rows[j * k:(j + 1) * k]
    value_model.train()
    rows = [r for ex in evaluation.gather_by_index(per_example) for r in ex]  # chosen, rejected alternating
    w_T = torch.tensor([r[0] for r in rows], dtype=torch.float64)  # every held-out response
    out = {"eval/td_loss": sum(r[3] for r in rows) / sum(r[4] for r in rows), "eval/value_mean": w_T.mean().item(),
           "eval/value_std": w_T.std(unbiased=False).item()}  # the scale RL divides by (docs/algorithm.md §7)
    if kind == "preference":  # rows alternate chosen, rejected
        table = {"final": w_T.float(), "mean": torch.tensor([r[1] for r in rows])}
        table.update({f"P{q}": torch.tensor([r[2][n] for r in rows]) for n, q in enumerate(PERCENTILES)})
        acc = {name: evaluation.pairwise_accuracy(v[0::2], v[1::2]) for name, v in table.items()}
        out["eval/pairwise_accuracy"] = acc["final"]
        out["eval/pairwise_accuracy_table"] = acc
        for pol in sorted({e["policy"] for e in examples if e["policy"] is not None}):
            sel = torch.tensor([e["policy"] == pol for e in examples])
            out[f"eval/pairwise_accuracy/{pol}"] = evaluation.pairwise_accuracy(table["final"][0::2][sel],
                                                                             table["final"][1::2][sel])
        out["eval/value_chosen_mean"] = table["final"][0::2].mean().item()
        out["eval/value_rejected_mean"] = table["final"][1::2].mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# Explain: per-token values (paper Figure 4)

def explain(cfg: Config):
    """--explain: the GVM's value of every token of one response (evaluation.explain)."""
    device = fu.setup(cfg.device)
    value_model, tok, gcfg = load_gvm(cfg.gvm, device, frozen=True)
    if gcfg.get("tau_k", 0):
        print(f"note: this GVM was trained with tau_k={gcfg['tau_k']}; explaining without τ context")
    prompt = evaluation.explain_prompt(cfg.prompt, cfg.messages, gcfg.get("chat_prompts", False))
    evaluation.explain(value_model, tok, prompt, cfg.response, device, bool(cfg.messages))


# ----------------------------------------------------------------------------------------------
# main: the recipe

def main(cfg: Config):
    if cfg.explain:
        return explain(cfg)
    device = fu.setup(cfg.device, cfg.dist_timeout_min)
    world = fu.world()
    tu.check_choice("grad_sync", cfg.grad_sync, ("every", "last"))
    if cfg.batch_size % world:  # every rank needs rows in every batch
        raise tu.ConfigError(f"--batch_size {cfg.batch_size} must be divisible by the {world} processes")
    tu.seed_everything(cfg.seed)  # the same on every rank
    metrics_path = tu.start_metrics(cfg.out_dir, vars(cfg))
    if not os.path.exists(cfg.model) and not cfg.data:
        sys.exit(f"gvm.py: no SFT policy at {cfg.model!r}; run `python sft.py` first (or pass --model)")
    tok = model.load_tokenizer(cfg.model)

    # 1. data: preference pairs (R = ±1) or scored rows (R = score), a held-out split, τ pools
    kind, train_rows, eval_rows = load_value_rows(cfg, tok, device)
    trunc = data.TruncationStats()
    train = encode_rows(train_rows, kind, tok, cfg, trunc)
    held = encode_rows(eval_rows, kind, tok, cfg, trunc)
    fu.print0(f"{len(train)} training and {len(held)} held-out {kind} rows; {trunc.summary()}")
    score_mu, score_sd = 0.0, 1.0
    if kind == "scored" and cfg.normalize_scores:
        scores = torch.tensor([e["score"] for e in train], dtype=torch.float64)
        score_mu = scores.mean().item()
        score_sd = max(scores.std().item(), 1e-8) if len(scores) > 1 else 1.0

    def R_of(e: dict, k: str) -> float:  # the terminal reward of response k of example e
        if kind == "preference":
            return 1.0 if k == "chosen" else -1.0
        return (e["score"] - score_mu) / score_sd

    pools, held_pools = tau_pools(train, kind), tau_pools(held, kind)
    if cfg.tau_k:
        for name, p in list(pools.items()) + list(held_pools.items()):
            if len({tuple(x[1]) for x in p}) <= cfg.tau_k:
                raise data.DataError(f"policy {name!r} has too few distinct prompts for --tau_k {cfg.tau_k}")

    # 2. model: SFT backbone + zero-initialised value head
    value_model = model.new_value_model(cfg.model, device)  # FSDP2: sharded under torchrun
    prompt_max = max(len(e["prompt"]) for e in train + held)
    response_max = max(len(e[k]) for e in train + held for k in e if k in ("chosen", "rejected", "response"))
    tau_item = min(cfg.tau_prompt_len, prompt_max) + min(cfg.tau_response_len, response_max)  # its longest
    data.check_context(prompt_max + response_max + cfg.tau_k * tau_item, value_model.backbone.config,
                       "τ + prompt + response")
    value_model.train()
    opt = torch.optim.AdamW(value_model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(value_model)
    steps_per_epoch = len(train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if total == 0:
        raise data.DataError(f"{len(train)} training rows is fewer than one batch of {cfg.batch_size}")
    t0 = time.time()
    step = 0
    bar = tqdm(total=total, desc="gvm", disable=fu.rank() != 0)
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        tu.python_rng(cfg.seed, "gvm/order", epoch).shuffle(order)  # the same order on every rank
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size][fu.rank()::world]  # this rank's rows

            # 3. TD(λ) on the chain, λ-return targets from the same forward without gradient (train_step)
            step_loss, gnorm = train_step(value_model, opt, train, idx, kind, pools, cfg, step, total,
                                          tok.pad_token_id, R_of, device)

            if step % cfg.log_every == 0 or step == total - 1:
                # the global loss is the sum of the ranks' shares: the mean over ranks of share × world
                m = fu.reduce_metrics({"train/td_loss": step_loss * world, "train/grad_norm": gnorm}, device)
                m.update({"step": step, "epoch": epoch, "train/lr": opt.param_groups[0]["lr"],
                          "time/seconds": time.time() - t0})
                tu.append_jsonl(metrics_path, m)
                bar.set_postfix(td_loss=f"{m['train/td_loss']:.4f}")
            bar.update(1)
            step += 1
    bar.close()

    # 4. save first (an out-of-memory in the evaluation must not lose the trained model), then evaluate on
    #    held-out rows; compare with the gold reward's own accuracy (built-in task)
    gcfg = {"gamma": cfg.gamma, "lam": cfg.lam, "tau_k": cfg.tau_k, "tau_prompt_len": cfg.tau_prompt_len,
            "tau_response_len": cfg.tau_response_len, "reward": kind, "score_mean": score_mu, "score_std": score_sd,
            "chat_prompts": any(isinstance(r["prompt"], list) for r in train_rows)}  # --explain encodes alike
    checkpoint.save_value_model(value_model, tok, cfg.out_dir, GVM_CONFIG, gcfg)  # a collective: rank 0 writes
    ev = evaluate(value_model, held, kind, held_pools, cfg, tok.pad_token_id, device, R_of)
    summary = {"train/pairs" if kind == "preference" else "train/rows": len(train),
               "eval/pairs" if kind == "preference" else "eval/rows": len(held),
               "train/steps": total, "train/seconds": time.time() - t0, "tau_k": cfg.tau_k, **ev}
    if not cfg.data and cfg.rtg_prompts > 0:  # built-in task: does the GVM track the true return-to-go?
        policy = AutoModelForCausalLM.from_pretrained(cfg.model).to(device).eval()
        summary.update(evaluation.return_to_go(value_model, policy, tok, cfg.builtin_samplers.split(","),
                                               cfg.rtg_prompts, cfg.rtg_completions, cfg.tau_k, cfg.tau_prompt_len,
                                               cfg.tau_response_len, cfg.seed, device))
        del policy
    if "gold_chosen" in eval_rows[0]:  # built-in task: the ceiling, the gold reward's own accuracy
        summary.update(evaluation.gold_accuracy(eval_rows))
    # the scale, fixed at training time so that the RL reward is stationary: dvpo.py divides the chain by value_std
    gcfg.update({"value_mean": ev["eval/value_mean"], "value_std": ev["eval/value_std"]})
    if kind == "preference":  # dvpo.py warns when this is within two standard errors of chance
        gcfg.update({"eval/pairwise_accuracy": ev["eval/pairwise_accuracy"], "eval/pairs": len(held)})
    tu.write_json(os.path.join(cfg.out_dir, GVM_CONFIG), gcfg)  # rank 0
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
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError) as e:  # bad input or flag: one clear line, no traceback
        sys.exit(f"gvm.py: {e}")
