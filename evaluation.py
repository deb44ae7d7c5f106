"""evaluation.py — what a run is judged on, and how: its prompts (a training and a held-out split,
the built-in task's or a file's), the evaluation reward (never in a loss), the held-out evaluation of
a policy, and the statistics that compare value models.

  1. Prompts: load_prompts (this rank's training prompts and the held-out ones).
  2. The evaluation reward: load_reward_fn (--eval_reward module:function, f(prompt, response) -> float;
     the built-in task's gold reward by default), rewards (checked to be finite numbers).
  3. evaluate_policy: held-out reward sampled and greedy, and the KL to the reference; eval_summary.
  4. Statistics: rank_correlation (Spearman, value drift and the return-to-go metric),
     pairwise_accuracy (ties count ½), gold_accuracy (the built-in task's noisy labels' own ceiling).
  5. Reading a value model: return_to_go (built-in task, docs/algorithm.md §11: do a value model's
     per-prefix values track the true expected reward?) and explain (the per-token values of one
     response, paper Figure 4), for the GVM and the reward model alike.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys

import torch

import data
import fsdp_utils as fu
import model
import task
import train_utils as tu

# ----------------------------------------------------------------------------------------------
# 1. Prompts


def load_prompts(path: str, tok, n_builtin: int, n_eval: int, max_prompt_len: int, seed: int,
                 trunc: data.TruncationStats):
    """(this rank's training prompt texts, their token ids, held-out prompt texts, builtin?).
    path empty: the built-in task, n_builtin training prompts and n_eval held-out ones (the same
    held-out set for every run and seed); a file: min(n_eval, 10%) prompts held out
    (data.split_heldout). Each rank keeps its own strided shard of the training prompts."""
    builtin = not path
    if builtin:
        train_prompts = task.builtin_prompts(n_builtin, "train", seed=tu.seed_for(seed, "prompts"))
        eval_prompts = task.builtin_prompts(n_eval, "eval", seed=0)
    else:
        rows, stats = data.load_records(path, "prompt")
        fu.print0(stats.summary())
        train_rows, eval_rows = data.split_heldout(rows, n_eval, 0.1, seed, "prompts")
        train_prompts, eval_prompts = [r["prompt"] for r in train_rows], [r["prompt"] for r in eval_rows]
    if len(train_prompts) < fu.world():
        raise data.DataError(f"{path}: {len(train_prompts)} training prompts for {fu.world()} processes; every "
                             "process needs at least one")
    my_texts = train_prompts[fu.rank()::fu.world()]
    my_prompts = [data.encode_prompt(tok, p, max_prompt_len, trunc) for p in my_texts]
    fu.print0(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held out"
              f"{' (no held-out evaluation)' if not eval_prompts else ''}; {trunc.summary()}")
    return my_texts, my_prompts, eval_prompts, builtin


# ----------------------------------------------------------------------------------------------
# 2. The evaluation reward

def load_reward_fn(spec: str, builtin: bool):
    """The evaluation reward: `module:function` names a Python callable f(prompt, response) -> float
    (the module is imported from the working directory or PYTHONPATH); empty = the built-in task's
    gold reward on the built-in task, and no reward (None) on your own prompts. Never used in a loss."""
    if not spec:
        return task.gold_reward if builtin else None
    module, _, name = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError) as e:
        raise tu.ConfigError(f"--eval_reward {spec!r}: cannot load it ({e})") from None
    if not callable(fn):
        raise tu.ConfigError(f"--eval_reward {spec!r}: expected module:function naming a callable "
                             "f(prompt, response) -> float")
    return fn


def rewards(reward_fn, prompts: list, response: torch.Tensor, tok, stop_ids: list[int] | None = None) -> list[float]:
    """reward_fn(prompt, decoded response) per row, checked to be a finite number. stop_ids: the stop tokens
    the rollout used (data.stop_token_ids(tok, policy.generation_config)), so each text is cut where
    sampling stopped; default: the tokenizer's own (EOS and end of turn)."""
    out = []
    for p, r in zip(prompts, response):
        v = reward_fn(p, data.decode_response(tok, r.tolist(), stop_ids))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise data.DataError(f"the evaluation reward returned {v!r} (a finite number is required) for "
                                 f"prompt {p!r}")
        out.append(float(v))
    return out


# ----------------------------------------------------------------------------------------------
# 3. Held-out evaluation of a policy

@torch.no_grad()
def evaluate_policy(policy, ref, tok, prompts: list, device, seed: int, max_new_tokens: int, reward_fn=None,
                    temperature: float = 1.0, top_p: float = 1.0, max_prompt_len: int | None = None,
                    batch_size: int = 64, micro_batch_size: int = 0) -> dict:
    """Held-out evaluation, each rank on its shard of `prompts`: responses sampled at `temperature`
    (reward mean and stderr) and greedy (reward), and, with a reference, the KL to it per sampled
    response Σ_t (log π - log π_ref) (mean and stderr). Without reward_fn only KL and length.
    Memory: batch_size prompts generated at once per rank (their KV cache), log-probs in micro-batches
    of micro_batch_size rows (0: the whole generation batch)."""
    if not prompts:
        return {}
    mine = prompts[fu.rank()::fu.world()]
    gen = tu.torch_rng(seed, "eval", fu.rank(), device=device)
    stops = data.stop_token_ids(tok, getattr(policy, "generation_config", None))  # where model.rollout stops
    sums = torch.zeros(7, dtype=torch.float64, device=device)  # on the device: NCCL reduces no CPU tensors
    n_batches = math.ceil(math.ceil(len(prompts) / fu.world()) / batch_size)  # the same on every rank
    for i in range(0, n_batches * batch_size, batch_size):
        texts = mine[i:i + batch_size]
        weight = 1.0 if texts else 0.0  # a rank with nothing left still joins the FSDP collectives
        texts = texts or prompts[:1]
        ids = [data.encode_prompt(tok, p, max_prompt_len) for p in texts]
        b = model.rollout(policy, ids, tok, max_new_tokens, temperature, top_p, gen, device)
        T = b["response"].shape[1]
        kl = torch.zeros(len(texts), dtype=torch.float64)
        if ref is not None:
            mask = data.response_mask(b["response_len"], T)
            logp = model.frozen_logprobs(policy, b, T, temperature, micro_batch_size)
            kl = ((logp - model.frozen_logprobs(ref, b, T, temperature, micro_batch_size)) * mask).sum(1).double().cpu()
        r = rg = torch.zeros(len(texts), dtype=torch.float64)
        if reward_fn is not None:
            greedy = model.rollout(policy, ids, tok, max_new_tokens, 0.0, 1.0, gen, device)
            r = torch.tensor(rewards(reward_fn, texts, b["response"], tok, stops), dtype=torch.float64)
            rg = torch.tensor(rewards(reward_fn, texts, greedy["response"], tok, stops), dtype=torch.float64)
        sums += weight * torch.stack([r.sum(), (r * r).sum(), rg.sum(), kl.sum(), (kl * kl).sum(),
                                      torch.tensor(float(len(texts)), dtype=torch.float64),
                                      b["response_len"].double().sum().cpu()]).to(device)
    fu.all_reduce_sum(sums)  # all-reduce: every rank
    s, s2, sg, skl, skl2, n, sl = sums.tolist()  # CPU-GPU sync

    def stderr(m, m2):  # undefined (nan) for one prompt: a sample variance needs two
        return math.sqrt(max(m2 / n - m * m, 0) / (n - 1)) if n > 1 else float("nan")

    out = {"response_len": sl / n}
    if ref is not None:
        out.update({"kl_to_ref": skl / n, "kl_to_ref_stderr": stderr(skl / n, skl2)})
    if reward_fn is not None:
        out.update({"reward": s / n, "reward_stderr": stderr(s / n, s2), "reward_greedy": sg / n})
    return out


def eval_summary(before: dict, after: dict) -> dict:
    """summary.json's held-out evaluation entries, before and after training. An undefined (nan) entry,
    a standard error over one held-out prompt, is left out: JSON has no nan (as in reduce_metrics)."""
    out = {f"eval/{k}": v for k, v in after.items() if not k.startswith("reward")}
    if "reward" in after:
        out.update({"eval/reward_before": before["reward"], "eval/reward_after": after["reward"],
                    "eval/reward_stderr": after["reward_stderr"], "eval/reward_stderr_before": before["reward_stderr"],
                    "eval/reward_greedy_before": before["reward_greedy"],
                    "eval/reward_greedy_after": after["reward_greedy"]})
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


def shard_batches(n: int, batch_size: int) -> list[list[int]]:
    """This rank's strided share of range(n) (rank, rank + world, ...) in batches of batch_size, padded with
    empty batches to the same count on every rank: a rank with nothing left still joins the FSDP2
    collectives of the forwards (the caller runs a dummy batch and drops its result)."""
    mine = list(range(fu.rank(), n, fu.world()))
    n_batches = math.ceil(math.ceil(n / fu.world()) / batch_size)
    return [mine[j * batch_size:(j + 1) * batch_size] for j in range(n_batches)]


def gather_by_index(local: dict) -> list:
    """Every rank's {item index: result} merged, as a list in index order, on every rank (all-gather)."""
    merged = {}
    for part in fu.all_gather_object(local):  # all-gather: every rank, pickled python objects
        merged.update(part)
    return [merged[i] for i in sorted(merged)]


# ----------------------------------------------------------------------------------------------
# 4. Statistics

def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor, ties sharing their average rank."""
    order = x.argsort()
    r = torch.empty(len(x), dtype=torch.float64)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    _, group = torch.unique(x, return_inverse=True)
    total = torch.zeros(int(group.max()) + 1, dtype=torch.float64).index_add_(0, group, r)
    count = torch.zeros_like(total).index_add_(0, group, torch.ones_like(r))
    return (total / count)[group]


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ of two 1-D tensors: the Pearson correlation of their average ranks (ties
    allowed); nan when either is constant or n < 2."""
    if len(a) < 2:
        return float("nan")
    ra, rb = average_ranks(a.detach().cpu()), average_ranks(b.detach().cpu())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def pairwise_accuracy(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of pairs with a > b; ties count one half."""
    return ((a > b).float() + 0.5 * (a == b).float()).mean().item()


def gold_accuracy(rows: list[dict]) -> dict:
    """The gold reward's own pairwise accuracy on labelled pairs (all, and per `policy`): the ceiling
    of a value model's, since the labels are noisy (built-in task: rows carry gold_chosen/gold_rejected)."""
    g = torch.tensor([[r["gold_chosen"], r["gold_rejected"]] for r in rows])
    out = {"eval/gold_pairwise_accuracy": pairwise_accuracy(g[:, 0], g[:, 1])}
    for pol in sorted({r["policy"] for r in rows}):  # per sampler, so τ's effect is visible
        sel = [i for i, r in enumerate(rows) if r["policy"] == pol]
        out[f"eval/gold_pairwise_accuracy/{pol}"] = pairwise_accuracy(g[sel, 0], g[sel, 1])
    return out


# ----------------------------------------------------------------------------------------------
# 5. Reading a value model: return-to-go (built-in task) and per-token values

def rtg_metrics(values: torch.Tensor, returns: torch.Tensor) -> dict:
    """How well values (N,) track Monte Carlo returns-to-go (N,) (docs/algorithm.md §11): Spearman's
    rank correlation, and the mean squared error left after the best affine map a·v + b of the values
    onto the returns (scale-free: a value model predicts its own target, not the gold reward)."""
    v, g = values.double(), returns.double()
    X = torch.stack([v, torch.ones_like(v)], 1)  # (N, 2)
    coef = torch.linalg.lstsq(X, g[:, None]).solution  # (2, 1): least-squares a, b
    return {"corr": rank_correlation(v, g), "mse": (g - (X @ coef).squeeze(1)).square().mean().item()}


RTG_POSITIONS = {"early": 1 / 6, "middle": 1 / 2, "late": 5 / 6}  # where in the response the prefix ends


@torch.no_grad()
def return_to_go(value_model, policy, tok, samplers: list[str], n_prompts: int, n_completions: int, tau_k: int,
                 tau_prompt_len: int, tau_response_len: int, seed: int, device) -> dict:
    """The return-to-go metric (built-in task, docs/algorithm.md §11). For n_prompts held-out prompts
    and each sampler: one response y from the sampler; in it an early, a middle and a late state
    s_k = x ⊕ y_<k (k = 1 + floor(f·T), f = 1/6, 1/2, 5/6, T = |y| + EOS); the true value of s_k for
    that sampler estimated by Monte Carlo (the mean gold reward of n_completions completions of s_k
    by the same sampler); the value model's value of s_k, w_{k-1}, read on [τ] ⊕ x ⊕ y with τ = tau_k
    responses of the same sampler to other prompts. rtg_metrics overall, per sampler, per position."""
    value_model.eval()
    prompts = task.builtin_prompts(n_prompts, "eval", seed=tu.seed_for(seed, "rtg/prompts"))
    gen, slips = tu.torch_rng(seed, "rtg", device=device), tu.python_rng(seed, "rtg/slips")
    values, returns, tags = [], [], []
    for spec in samplers:
        ys = task.sample_builtin(policy, tok, prompts, spec, gen, slips, device=device)
        enc = [(data.encode_prompt(tok, p), data.encode_response(tok, y)) for p, y in zip(prompts, ys)]
        rng = tu.python_rng(seed, "rtg/tau", spec)
        tau = [data.tau_prefix([enc[j] for j in rng.sample([j for j in range(len(enc)) if prompts[j] != p], tau_k)],
                               tau_prompt_len, tau_response_len)
               for p in prompts]
        batch = data.collate_right([t + e[0] for t, e in zip(tau, enc)], [e[1] for e in enc], tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        u = value_model(batch["input_ids"], batch["attention_mask"]).float()
        w, _ = model.value_chain(u, batch["prompt_len"], batch["response_len"])
        cases = [(i, 1 + int(f * len(enc[i][1])), pos) for i in range(len(prompts)) for pos, f in RTG_POSITIONS.items()]
        values += [w[i, k - 1].item() for i, k, _ in cases]  # V(s_k) = w_{k-1}
        returns += task.mc_returns(policy, tok, prompts, ys, [c[:2] for c in cases], spec, n_completions, gen,
                                   slips, device).tolist()
        tags += [(f"sft@{spec}", pos) for _, _, pos in cases]
    value_model.train()
    values, returns = torch.tensor(values), torch.tensor(returns)
    out = {f"eval/rtg_{k}": v for k, v in rtg_metrics(values, returns).items()}
    groups = sorted({t[0] for t in tags}) + list(RTG_POSITIONS)
    for g in groups:
        sel = torch.tensor([g in t for t in tags])
        out.update({f"eval/rtg_{k}/{g}": v for k, v in rtg_metrics(values[sel], returns[sel]).items()})
    return out


def explain_prompt(prompt: str, messages: str, chat_prompts: bool):
    """The prompt to explain: `messages` (a JSON list of {role, content}) as given; a plain `prompt` as
    one user message when the value model was trained on chat prompts (its config's chat_prompts), so
    it is encoded as training encoded its prompts; otherwise the text as is."""
    if messages:
        try:
            return data.parse_prompt({"prompt": json.loads(messages)}, "--messages")["prompt"]
        except json.JSONDecodeError as e:
            raise data.DataError(f"--messages: invalid JSON: {e.msg}") from None
    if not prompt:
        raise data.DataError("--explain needs --prompt or --messages (and --response)")
    return [{"role": "user", "content": prompt}] if chat_prompts else prompt


@torch.inference_mode()
def explain(value_model, tok, prompt, response: str, device, from_messages: bool = False) -> list[float]:
    """Print a value model's chain on one response (paper Figure 4): w_0 = V(prompt), then for each
    response token w_t and the increment w_t - w_{t-1} it caused, and the terminal w_T. Returns the
    chain w_0..w_T. `prompt`: text or chat messages (explain_prompt)."""
    p, r = data.encode_prompt(tok, prompt), data.encode_response(tok, response)
    batch = {k: v.to(device) for k, v in data.collate_right([p], [r], tok.pad_token_id).items()}
    u = value_model(batch["input_ids"], batch["attention_mask"]).float()
    w, _ = model.value_chain(u, batch["prompt_len"], batch["response_len"])
    w = w[0].tolist()
    how = "plain text" if isinstance(prompt, str) else "chat template" if tok.chat_template else \
        "role: content lines, no chat template"
    if isinstance(prompt, list) and not from_messages:
        how += ", --prompt as a user message: this value model was trained on chat prompts"
    print(f"prompt ({how}), the exact {len(p)} tokens scored: {tok.convert_ids_to_tokens(p)}")
    print(f"w_0 = V(prompt) = {w[0]:+.3f}, read at the last prompt token")
    print(f"{'t':>3}  {'token':<12} {'w_t':>8} {'w_t - w_t-1':>12}")
    for t, tid in enumerate(r, 1):
        bar = "+" * round(max(w[t] - w[t - 1], 0) * 20) or "-" * round(max(w[t - 1] - w[t], 0) * 20)
        print(f"{t:>3}  {tok.convert_ids_to_tokens(tid)!r:<12} {w[t]:>+8.3f} {w[t] - w[t - 1]:>+12.3f}  {bar}")
    print(f"terminal value w_T = {w[-1]:+.3f} (the value model's estimate of the response's reward)")
    if isinstance(prompt, str) and prompt.endswith(":") and prompt[:-1].isdigit():
        print(f"gold reward (built-in task) = {task.gold_reward(prompt, response):.3f}")
    return w
