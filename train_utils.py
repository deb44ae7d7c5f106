"""train_utils.py — the training plumbing that sft.py, gvm.py, dvpo.py and ppo_baseline.py share.

No algorithm lives here (that stays in the scripts, next to its equations); this is what every
training script needs around the algorithm, written once:
  1. Models in and out: load_policy (a hub id, a local path, or the built-in tiny Llama) and
     ValueModel, a causal-LM backbone + a linear value head — the GVM, the reward model and the
     critic all have this shape — with load_value_model (checkpoint.save_value_model writes one).
     Every loader returns the model on its device, sharded under torchrun (fsdp_utils.on_device: rank 0 reads,
     the others get shards).
  2. Data and rollouts: load_rows / load_value_rows (preference or scored rows, a held-out split),
     load_prompts (the built-in task or a file, with a held-out split),
     rollout (one sampled response per prompt, in the layout every loss reads), frozen_logprobs.
  3. Seeds, schedules and checks: seed_for (every random draw of a run comes from --seed, a
     purpose, the step and the rank), lr_at (warmup + cosine), check_batch_sizes.
  4. Evaluation: evaluate_policy (held-out reward sampled and greedy, KL to the reference) with a
     reward plug-in (--eval_reward module:function; the built-in task's gold reward by default).
  5. Bookkeeping: metrics rows and summaries, the non-finite guard. (Saving and crash-safe
     checkpoints: checkpoint.py.)
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import random
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import data
import fsdp_utils as fu
import task

# ----------------------------------------------------------------------------------------------
# 1. Models in and out


def load_tokenizer(path: str):
    """AutoTokenizer with a pad token (the EOS token when the tokenizer has none)."""
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    """--frozen_dtype: the dtype of the frozen models (reference, GVM, reward model). auto = bfloat16
    on CUDA (half the memory; their forwards compute in bf16 anyway) and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16"):
        raise data.DataError(f"--frozen_dtype must be auto, float32 or bfloat16, got {name!r}")
    return getattr(torch, name)


def load_policy(path: str, device="cpu", seed: int = 0, dtype=torch.float32, frozen: bool = False):
    """(model, tokenizer) from a hub id / local path, or the built-in tiny model if path is empty,
    on `device`, sharded under torchrun. Trained: fp32, the master weights (bf16 compute comes from
    FSDP's policy); frozen (the reference): dtype (see frozen_dtype)."""
    if not path:
        tok = task.build_char_tokenizer()
        return fu.on_device(lambda meta: task.build_tiny_model(tok, seed=seed).to(dtype), device, frozen), tok
    return fu.on_device(lambda meta: fu.hf_model(path, dtype, meta), device, frozen), load_tokenizer(path)


class ValueModel(nn.Module):
    """Causal-LM backbone (AutoModel, no LM head) + nn.Linear(H, 1): one scalar per position.
    forward -> u: (B, L). The GVM, the Bradley-Terry reward model and the PPO critic."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # starts at 0 everywhere: no prior on the values
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=data.position_ids(attention_mask)).last_hidden_state  # (B, L, H)
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, L)


def new_value_model(path: str, device="cpu", dtype=torch.float32, frozen: bool = False) -> ValueModel:
    """A value model whose backbone starts from a causal LM (e.g. the SFT policy), head at zero,
    on `device`, sharded under torchrun; trained: fp32 (frozen: in dtype, as load_value_model)."""
    return fu.on_device(lambda meta: ValueModel(fu.hf_model(path, dtype, meta, AutoModel)).to(dtype), device, frozen)


def load_value_model(path: str, config_name: str, hint: str, device="cpu", dtype=torch.float32,
                     frozen: bool = False):
    """(model, tokenizer, config) from a folder written by save_value_model: the backbone in HF
    format, value_head.safetensors and a JSON config named config_name (gvm_config.json,
    rm_config.json, critic_config.json). `hint` says how to make one when the folder is wrong.
    On `device`, sharded under torchrun; frozen (GVM, reward model): no gradients, in dtype."""
    for name in ("config.json", "value_head.safetensors", config_name):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: missing {name}; {hint}")

    def load(meta):
        model = ValueModel(fu.hf_model(path, dtype, meta, AutoModel))
        if not meta:
            model.value_head.load_state_dict(load_file(os.path.join(path, "value_head.safetensors")))
        return model.to(dtype)
    with open(os.path.join(path, config_name)) as f:
        config = json.load(f)
    return fu.on_device(load, device, frozen), load_tokenizer(path), config


def value_scale(config: dict, normalize: bool, path: str) -> float:
    """The std of a value model's terminal value over its held-out responses, recorded when it was
    trained (docs/algorithm.md §7): RL divides w_T (or the RM score) by it. 1.0 when not normalizing."""
    if not normalize:
        return 1.0
    if "value_std" not in config:
        sys.exit(f"{path}: its config has no value_std (trained before scale normalization); train it "
                 "again, or pass --normalize_reward false")
    if not math.isfinite(config["value_std"]) or config["value_std"] <= 0:
        sys.exit(f"{path}: value_std is {config['value_std']}: its terminal value is the same for every held-out "
                 "response, so it ranks nothing; train it longer, or pass --normalize_reward false")
    return float(config["value_std"])


# ----------------------------------------------------------------------------------------------
# 2. Data and rollouts

def split_heldout(rows: list, n_eval: int, frac: float, seed: int, what: str) -> tuple[list, list]:
    """(training rows, held-out rows): shuffled with --seed, then min(n_eval, max(1, frac·N)) rows
    held out: at least one when there are two or more rows, never all of them; n_eval <= 0 holds
    none out. The same (seed, what) gives the same split in every script (gvm.py and the RM)."""
    rows = list(rows)
    python_rng(seed, "split", what).shuffle(rows)
    k = 0 if n_eval <= 0 or len(rows) < 2 else min(n_eval, max(1, int(frac * len(rows))), len(rows) - 1)
    return rows[k:], rows[:k]


def load_rows(path: str, eval_path: str, kind: str, skip_bad: bool, frac: float, seed: int) -> tuple[list, list]:
    """(training rows, held-out rows) of `kind` (data.PARSERS) from `path`, and from `eval_path` or else
    a split of `path` (split_heldout: gvm.py and ppo_baseline.py split a file alike). Says what each
    file gave."""
    rows, stats = data.load_records(path, kind, skip_bad)
    fu.print0(stats.summary())
    if not eval_path:
        return split_heldout(rows, len(rows), frac, seed, kind)
    held, stats = data.load_records(eval_path, kind, skip_bad)
    fu.print0(stats.summary())
    return rows, held


def load_value_rows(cfg, tok, device, script: str) -> tuple[str, list, list]:
    """(kind, training rows, held-out rows) of a value model (gvm.py): from cfg.data (preference or
    scored) with cfg.eval_data or a split, or the built-in task's pairs sampled from cfg.model by each
    of cfg.builtin_samplers. Writes the exact rows used, so ppo_baseline.py's reward model can train
    on the same pairs and split."""
    kind = cfg.data_kind
    if kind not in ("preference", "scored"):
        sys.exit(f"{script}: --data_kind must be 'preference' or 'scored', got {cfg.data_kind!r}")
    if not cfg.data:
        kind = "preference"
        rows = None
        if fu.rank() == 0:  # sampled on rank 0 only (no other rank loads the policy), then broadcast
            policy = AutoModelForCausalLM.from_pretrained(cfg.model).to(device).eval()
            rows = task.builtin_pair_splits(
                policy, tok, cfg.builtin_samplers.split(","), cfg.builtin_prompts, cfg.builtin_eval_prompts,
                cfg.bt_temperature, lambda i: seed_for(cfg.seed, "pairs/prompts", i),
                lambda i, split: seed_for(cfg.seed, "pairs", i, split), device)
            del policy
        rows = fu.broadcast_object(rows)
        train_rows, eval_rows = rows["train"], rows["eval"]
    else:
        train_rows, eval_rows = load_rows(cfg.data, cfg.eval_data, kind, cfg.skip_bad, cfg.eval_frac, cfg.seed)
    if not train_rows or not eval_rows:
        sys.exit(f"{script}: need training and held-out rows, got {len(train_rows)} and {len(eval_rows)} "
                 f"(a file needs at least 2 rows to split, or pass --eval_data)")
    if fu.rank() == 0:
        for split, rs in (("train", train_rows), ("eval", eval_rows)):
            name = f"pairs_{split}.jsonl" if kind == "preference" else f"scored_{split}.jsonl"
            with open(os.path.join(cfg.out_dir, name), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rs)
    return kind, train_rows, eval_rows


def load_prompts(cfg, tok, trunc: data.TruncationStats):
    """(this rank's prompt texts, their token ids, held-out prompt texts, builtin?). Built-in task:
    steps × batch_size training prompts and eval_prompts held-out ones (the same held-out set for
    every run and seed); a file: min(eval_prompts, 10%) prompts held out (split_heldout). Each rank
    reads its own shard."""
    builtin = not cfg.prompts
    if builtin:
        train_prompts = task.builtin_prompts(cfg.steps * cfg.batch_size, "train", seed=seed_for(cfg.seed, "prompts"))
        eval_prompts = task.builtin_prompts(cfg.eval_prompts, "eval", seed=0)
    else:
        rows, stats = data.load_records(cfg.prompts, "prompt")
        fu.print0(stats.summary())
        train_rows, eval_rows = split_heldout(rows, cfg.eval_prompts, 0.1, cfg.seed, "prompts")
        train_prompts, eval_prompts = [r["prompt"] for r in train_rows], [r["prompt"] for r in eval_rows]
    if len(train_prompts) < fu.world():
        sys.exit(f"{cfg.prompts}: {len(train_prompts)} training prompts for {fu.world()} processes; every "
                 "process needs at least one")
    my_texts = train_prompts[fu.rank()::fu.world()]
    my_prompts = [data.encode_prompt(tok, p, cfg.max_prompt_len, trunc) for p in my_texts]
    fu.print0(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held out"
              f"{' (no held-out evaluation)' if not eval_prompts else ''}; {trunc.summary()}")
    return my_texts, my_prompts, eval_prompts, builtin


@torch.no_grad()
def rollout(policy, prompt_ids: list[list[int]], tok, max_new_tokens: int, temperature: float, top_p: float,
            generator, device, min_new_tokens: int = 0) -> dict:
    """Sample one response per prompt. Layout: left-padded prompts (width P) ⊕ right-padded
    responses (width T), so every row's response starts at column P: prompt_len = P for all rows."""
    enc = data.collate_left(prompt_ids, tok.pad_token_id)
    enc = {k: v.to(device) for k, v in enc.items()}
    stops = data.stop_token_ids(tok, getattr(policy, "generation_config", None))  # EOS, end of turn, the model's
    with fu.gathered(policy):  # eval mode, parameters gathered once for the whole rollout
        resp, resp_len, truncated = data.generate(
            policy, enc["input_ids"], enc["attention_mask"], max_new_tokens, stops,
            tok.pad_token_id, temperature, top_p, generator, min_new_tokens)
    B, P, T = resp.shape[0], enc["input_ids"].shape[1], resp.shape[1]
    return {"input_ids": torch.cat([enc["input_ids"], resp], 1),
            "attention_mask": torch.cat([enc["attention_mask"], data.response_mask(resp_len, T).long()], 1),
            "prompt_len": torch.full((B,), P, device=device), "response_len": resp_len,
            "truncated": truncated, "response": resp, "prompt_ids": prompt_ids}


def responses(batch: dict) -> list[list[int]]:
    """Each row's response ids without padding (EOS included when the row has one)."""
    return [r[:n].tolist() for r, n in zip(batch["response"], batch["response_len"])]


@torch.no_grad()
def frozen_logprobs(model, batch: dict, T: int, temperature: float) -> torch.Tensor:
    """log π(y_t | s_t) with no gradient: the reference, or the policy before the update.
    (no_grad, not inference_mode: under FSDP2 inference_mode would turn the trained policy's
    gathered parameter buffers into inference tensors, which its next training step cannot update.)"""
    logp, _ = data.response_logprobs(model, batch, T, temperature)
    fu.reshard(model)  # FSDP2 keeps the root gathered after forward: free it
    return logp.clone()


# ----------------------------------------------------------------------------------------------
# 3. Seeds, schedules and checks

def seed_for(seed: int, *keys) -> int:
    """The seed of one stream of random draws, from the run's --seed and what the stream is for,
    e.g. seed_for(seed, "rollout", step, rank). Every random draw of a run comes from such a stream,
    so runs with different --seed differ in every draw (minibatch order included), and a run
    resumed at step k repeats exactly the draws an uninterrupted run makes from step k on."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: valid for torch and python


def torch_rng(seed: int, *keys, device="cpu") -> torch.Generator:
    """A torch.Generator on `device` for the stream seed_for(seed, *keys)."""
    return torch.Generator(device=device).manual_seed(seed_for(seed, *keys))


def python_rng(seed: int, *keys) -> random.Random:
    """A random.Random for the stream seed_for(seed, *keys)."""
    return random.Random(seed_for(seed, *keys))


def seed_everything(seed: int):
    """Seed the global python and torch generators, the same on every rank (initial weights)."""
    s = seed_for(seed, "global")
    random.seed(s)
    torch.manual_seed(s)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def check_batch_sizes(cfg, world: int, script: str):
    """Rollout batch -> minibatches -> per-rank micro-batches must divide evenly."""
    for name in ("batch_size", "minibatch_size"):
        if getattr(cfg, name) % world:
            sys.exit(f"{script}: --{name} {getattr(cfg, name)} must be divisible by the {world} processes")
    mb_rank = cfg.minibatch_size // world
    if cfg.batch_size % cfg.minibatch_size or mb_rank % min(cfg.micro_batch_size, mb_rank):
        sys.exit(f"{script}: batch_size must be a multiple of minibatch_size, and minibatch_size/world "
                 "of micro_batch_size")


# ----------------------------------------------------------------------------------------------
# 4. Evaluation (held-out prompts)

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
        raise data.DataError(f"--eval_reward {spec!r}: cannot load it ({e})") from None
    if not callable(fn):
        raise data.DataError(f"--eval_reward {spec!r}: expected module:function naming a callable "
                             "f(prompt, response) -> float")
    return fn


def rewards(reward_fn, prompts: list, response: torch.Tensor, tok) -> list[float]:
    """reward_fn(prompt, decoded response) per row, checked to be a finite number."""
    out = []
    for p, r in zip(prompts, response):
        v = reward_fn(p, data.decode_response(tok, r.tolist()))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise data.DataError(f"the evaluation reward returned {v!r} (a finite number is required) for "
                                 f"prompt {p!r}")
        out.append(float(v))
    return out


@torch.no_grad()
def evaluate_policy(policy, ref, tok, prompts: list, device, seed: int, max_new_tokens: int, reward_fn=None,
                    temperature: float = 1.0, top_p: float = 1.0, max_prompt_len: int | None = None,
                    batch_size: int = 256) -> dict:
    """Held-out evaluation, each rank on its shard of `prompts`: responses sampled at `temperature`
    (reward mean and stderr) and greedy (reward), and, with a reference, the KL to it per sampled
    response Σ_t (log π - log π_ref) (mean and stderr). Without reward_fn only KL and length."""
    if not prompts:
        return {}
    mine = prompts[fu.rank()::fu.world()]
    gen = torch_rng(seed, "eval", fu.rank(), device=device)
    sums = torch.zeros(7, dtype=torch.float64, device=device)  # on the device: NCCL reduces no CPU tensors
    n_batches = math.ceil(math.ceil(len(prompts) / fu.world()) / batch_size)  # the same on every rank
    for i in range(0, n_batches * batch_size, batch_size):
        texts = mine[i:i + batch_size]
        weight = 1.0 if texts else 0.0  # a rank with nothing left still joins the FSDP collectives
        texts = texts or prompts[:1]
        ids = [data.encode_prompt(tok, p, max_prompt_len) for p in texts]
        b = rollout(policy, ids, tok, max_new_tokens, temperature, top_p, gen, device)
        T = b["response"].shape[1]
        kl = torch.zeros(len(texts), dtype=torch.float64)
        if ref is not None:
            mask = data.response_mask(b["response_len"], T)
            kl = ((frozen_logprobs(policy, b, T, temperature) - frozen_logprobs(ref, b, T, temperature))
                  * mask).sum(1).double().cpu()
        r = rg = torch.zeros(len(texts), dtype=torch.float64)
        if reward_fn is not None:
            greedy = rollout(policy, ids, tok, max_new_tokens, 0.0, 1.0, gen, device)
            r = torch.tensor(rewards(reward_fn, texts, b["response"], tok), dtype=torch.float64)
            rg = torch.tensor(rewards(reward_fn, texts, greedy["response"], tok), dtype=torch.float64)
        sums += weight * torch.stack([r.sum(), (r * r).sum(), rg.sum(), kl.sum(), (kl * kl).sum(),
                                      torch.tensor(float(len(texts)), dtype=torch.float64),
                                      b["response_len"].double().sum().cpu()]).to(device)
    fu.all_reduce_sum(sums)
    s, s2, sg, skl, skl2, n, sl = sums.tolist()
    stderr = lambda m, m2: math.sqrt(max(m2 / n - m * m, 0) / max(n - 1, 1))  # noqa: E731
    out = {"response_len": sl / n}
    if ref is not None:
        out.update({"kl_to_ref": skl / n, "kl_to_ref_stderr": stderr(skl / n, skl2)})
    if reward_fn is not None:
        out.update({"reward": s / n, "reward_stderr": stderr(s / n, s2), "reward_greedy": sg / n})
    return out


def eval_summary(before: dict, after: dict) -> dict:
    """summary.json's held-out evaluation entries, before and after training."""
    out = {f"eval/{k}": v for k, v in after.items() if not k.startswith("reward")}
    if "reward" in after:
        out.update({"eval/reward_before": before["reward"], "eval/reward_after": after["reward"],
                    "eval/reward_stderr": after["reward_stderr"], "eval/reward_stderr_before": before["reward_stderr"],
                    "eval/reward_greedy_before": before["reward_greedy"],
                    "eval/reward_greedy_after": after["reward_greedy"]})
    return out


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


# ----------------------------------------------------------------------------------------------
# 5. Bookkeeping: metrics and summaries

class NonFiniteError(RuntimeError):
    """A NaN or inf in a loss, an advantage or a gradient norm: the run stops (without saving)."""


def check_finite(x, what: str, step: int):
    """Raise NonFiniteError naming the step and the quantity if x has a NaN or inf. Call it on
    quantities that are the same on every rank (all-reduced or derived from global statistics),
    so that every rank stops at the same point instead of one of them waiting in a collective."""
    if not torch.isfinite(torch.as_tensor(x)).all():
        raise NonFiniteError(f"step {step}: non-finite {what}; stopped without saving this step")


def start_metrics(out_dir: str, cfg, keep: bool = False) -> str:
    """Write train_config.json (config.json is the model's, as HF loaders require) and return the
    path of metrics.jsonl, emptied unless keep (a resumed run appends to it)."""
    os.makedirs(out_dir, exist_ok=True)
    fu.write_json(os.path.join(out_dir, "train_config.json"), cfg if isinstance(cfg, dict) else vars(cfg))
    path = os.path.join(out_dir, "metrics.jsonl")
    if fu.rank() == 0 and os.path.exists(path) and not keep:
        os.remove(path)
    return path


def step_row(m: dict, device, **extra) -> dict:
    """One metrics.jsonl row: per-rank scalars averaged over ranks, then the rank-0 extras."""
    m = fu.reduce_metrics(m, device)
    m.update(extra)
    m["memory/peak_gb"] = fu.peak_memory(device) / 2**30
    return m


def finish(out_dir: str, summary: dict):
    """Write summary.json and print it on one line."""
    fu.write_json(os.path.join(out_dir, "summary.json"), summary)
    fu.print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                         if isinstance(v, (int, float, str))))
