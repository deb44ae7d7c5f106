"""train_utils.py — the training plumbing that sft.py, gvm.py, dvpo.py and ppo_baseline.py share.

No algorithm lives here (that stays in the scripts, next to its equations); this is what every
training script needs around the algorithm, written once:
  1. Models in and out: load_policy (a hub id, a local path, or the built-in tiny Llama) and
     ValueModel, a causal-LM backbone + a linear value head — the GVM, the reward model and the
     critic all have this shape — with save_value_model / load_value_model. Every loader returns the
     model on its device, sharded under torchrun (on_device: rank 0 reads, the others get shards).
  2. Prompts and rollouts: load_prompts (the built-in task or a file, with a held-out split),
     rollout (one sampled response per prompt, in the layout every loss reads), frozen_logprobs.
  3. Seeds, schedules and checks: seed_for (every random draw of a run comes from --seed, a
     purpose, the step and the rank), lr_at (warmup + cosine), check_batch_sizes.
  4. Evaluation: evaluate_policy (held-out reward sampled and greedy, KL to the reference) with a
     reward plug-in (--eval_reward module:function; the built-in task's gold reward by default).
  5. Bookkeeping: metrics rows and summaries; crash-safe checkpoints: a manifest marks a complete one,
     recover_checkpoint promotes the newest complete one after a kill at any instant, resume_or_fresh
     implements --resume no|auto|yes and --overwrite (docs/checkpoints.md).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import random
import shutil
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import data
import fsdp_utils as fu

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


def on_device(load, device, frozen: bool = False):
    """The one way a script gets a model: `load(meta)` builds it — on the CPU with its weights
    (meta=False), or the same modules on the meta device, no memory (meta=True). One process:
    load(False) moved to `device`. Under torchrun (sharded loading): rank 0 calls load(False), every
    rank shards load(True), and rank 0's weights are broadcast into the shards (fsdp_utils.shard):
    no rank but 0 ever holds the full model. frozen: no gradients, eval mode."""
    full = load(False) if fu.rank() == 0 else None
    model = full
    if fu.is_dist():
        with torch.device("meta"):
            model = load(True)
    if frozen:
        model.requires_grad_(False).eval()
    return fu.shard(model, device, full=full)


def hf_model(path: str, dtype: torch.dtype, meta: bool, cls=AutoModelForCausalLM):
    """The HF model at `path` in `dtype`: loaded (from_pretrained), or, on the meta device, the same
    modules built from its config, with the generation settings from_pretrained would read."""
    if not meta:
        return cls.from_pretrained(path, dtype=dtype)
    model = cls.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: from_pretrained keeps the default from the config too
            pass
    return model


def load_policy(path: str, device="cpu", seed: int = 0, dtype=torch.float32, frozen: bool = False):
    """(model, tokenizer) from a hub id / local path, or the built-in tiny model if path is empty,
    on `device`, sharded under torchrun. Trained: fp32, the master weights (bf16 compute comes from
    FSDP's policy); frozen (the reference): dtype (see frozen_dtype)."""
    if not path:
        tok = data.build_char_tokenizer()
        return on_device(lambda meta: data.build_tiny_model(tok, seed=seed).to(dtype), device, frozen), tok
    return on_device(lambda meta: hf_model(path, dtype, meta), device, frozen), load_tokenizer(path)


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
    return on_device(lambda meta: ValueModel(hf_model(path, dtype, meta, AutoModel)).to(dtype), device, frozen)


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
        model = ValueModel(hf_model(path, dtype, meta, AutoModel))
        if not meta:
            model.value_head.load_state_dict(load_file(os.path.join(path, "value_head.safetensors")))
        return model.to(dtype)
    with open(os.path.join(path, config_name)) as f:
        config = json.load(f)
    return on_device(load, device, frozen), load_tokenizer(path), config


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


def split_value_state(sd: dict) -> tuple[dict, dict]:
    """Full ValueModel state dict -> (backbone state dict, value head state dict)."""
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    head = {k[len("value_head."):]: v for k, v in sd.items() if k.startswith("value_head.")}
    return backbone, head


def write_value_model(model: ValueModel, tokenizer, folder: str, state_dict: dict, config_name: str, config: dict):
    """Rank 0 writes a value model folder from a full state dict (see save_value_model)."""
    backbone, head = split_value_state(state_dict)
    fu.write_hf(model.backbone, tokenizer, folder, backbone,
                {"value_head.safetensors": head, config_name: config})


def save_value_model(model: ValueModel, tokenizer, path: str, config_name: str, config: dict):
    """Backbone in HF format (safetensors) + value_head.safetensors + config + tokenizer.
    A collective under FSDP: every rank calls it, rank 0 writes."""
    sd = fu.full_state_dict(model)
    with fu.staged_dir(path) as tmp:
        if tmp is not None:
            write_value_model(model, tokenizer, tmp, sd, config_name, config)
    fu.barrier()


# ----------------------------------------------------------------------------------------------
# 2. Prompts and rollouts

def split_heldout(rows: list, n_eval: int, frac: float, seed: int, what: str) -> tuple[list, list]:
    """(training rows, held-out rows): shuffled with --seed, then min(n_eval, max(1, frac·N)) rows
    held out: at least one when there are two or more rows, never all of them; n_eval <= 0 holds
    none out. The same (seed, what) gives the same split in every script (gvm.py and the RM)."""
    rows = list(rows)
    python_rng(seed, "split", what).shuffle(rows)
    k = 0 if n_eval <= 0 or len(rows) < 2 else min(n_eval, max(1, int(frac * len(rows))), len(rows) - 1)
    return rows[k:], rows[:k]


def load_prompts(cfg, tok, trunc: data.TruncationStats):
    """(this rank's prompt texts, their token ids, held-out prompt texts, builtin?). Built-in task:
    steps × batch_size training prompts and eval_prompts held-out ones (the same held-out set for
    every run and seed); a file: min(eval_prompts, 10%) prompts held out (split_heldout). Each rank
    reads its own shard."""
    builtin = not cfg.prompts
    if builtin:
        train_prompts = data.builtin_prompts(cfg.steps * cfg.batch_size, "train", seed=seed_for(cfg.seed, "prompts"))
        eval_prompts = data.builtin_prompts(cfg.eval_prompts, "eval", seed=0)
    else:
        rows, stats = data.load_records(cfg.prompts, "prompt")
        fu.print0(stats.summary())
        train_rows, eval_rows = split_heldout(rows, cfg.eval_prompts, 0.1, cfg.seed, "prompts")
        train_prompts, eval_prompts = [r["prompt"] for r in train_rows], [r["prompt"] for r in eval_rows]
    if len(train_prompts) < fu.world():
        sys.exit(f"{cfg.prompts}: {len(train_prompts)} training prompts for {fu.world()} processes; every "
                 "process needs at least one")
    my_texts = data.shard(train_prompts, fu.rank(), fu.world())
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
        return data.gold_reward if builtin else None
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
    mine = data.shard(prompts, fu.rank(), fu.world())
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
# 5. Bookkeeping: metrics, summaries, checkpoints

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


def trim_metrics(path: str, step: int):
    """On resume: keep the metrics.jsonl rows of steps up to the checkpoint's (the resumed run logs the
    later ones again) and drop a line cut short by a kill during its append. Rewritten atomically."""
    if fu.rank() != 0 or not os.path.exists(path):
        return
    rows = []
    for line in open(path):
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line.rstrip("\n") + "\n")
        except (ValueError, KeyError):  # a partial line: the run was killed while appending it
            pass
    write_atomic(path, "".join(rows))


def fsync_path(path: str):
    """Flush a file, or a folder's entries (names created or renamed in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str):
    """Replace a file's content so that a kill (or a crash) at any instant leaves the old or the new one."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_path(os.path.dirname(path) or ".")


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


MANIFEST = "manifest.json"  # written last into a checkpoint folder: the mark that it is complete
SUFFIXES = ("", ".old", ".tmp")  # checkpoint, checkpoint.old, checkpoint.tmp; preferred in this order on a tie


def checkpoint_status(folder: str) -> int | str:
    """The step of the complete checkpoint in `folder` (its manifest exists and every file it lists exists
    with the listed size: this catches truncated weights and a missing trainer state), or why it is not one."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        step, files = int(manifest["step"]), dict(manifest["files"])
    except FileNotFoundError:
        return f"{folder} has no {MANIFEST} (a save or a deletion that did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{os.path.join(folder, MANIFEST)} is unreadable ({e})"
    for rel, size in files.items():
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            return f"{p} is missing"
        if os.path.getsize(p) != size:
            return f"{p} has {os.path.getsize(p)} bytes, the manifest says {size} (truncated?)"
    return step


def write_manifest(folder: str, step: int):
    """Mark a fully written checkpoint folder complete: flush every file to disk, then write the manifest
    (step, each file's size) atomically. A kill before it leaves a folder that recovery discards."""
    files = {}
    for root, _, names in sorted(os.walk(folder)):
        for n in sorted(names):
            fsync_path(os.path.join(root, n))
            files[os.path.relpath(os.path.join(root, n), folder)] = os.path.getsize(os.path.join(root, n))
        fsync_path(root)
    fu.fault_point("files")
    write_atomic(os.path.join(folder, MANIFEST), json.dumps({"step": step, "files": files}, indent=1))
    fu.fault_point("manifest")


def remove_checkpoint(folder: str):
    """Delete a checkpoint folder, its manifest first: a kill half-way leaves a visibly incomplete folder
    (which recovery deletes), never one that looks complete or blocks a rename."""
    if os.path.exists(os.path.join(folder, MANIFEST)):
        os.remove(os.path.join(folder, MANIFEST))
        fsync_path(folder)
    for root, _, names in os.walk(folder):
        for n in names:
            os.remove(os.path.join(root, n))
            fu.fault_point("delete")
    shutil.rmtree(folder)


def recover_checkpoint(path: str) -> tuple[int | None, str]:
    """Rank 0, at start-up and around every save. Of path, path.old and path.tmp: make the newest complete
    checkpoint (highest step) `path`, keep the newest complete one before it as path.old (the fallback
    if `path` turns out corrupted), delete the rest. Returns (its step, the suffix it had) or (None, "").
    Every action either deletes a folder that is not the newest complete one or is one atomic rename, so
    a kill at any instant leaves the newest complete checkpoint under one of the three names, and calling
    this again finishes the job. A save = write path.tmp, then its manifest, then call this (the swap)."""
    status = {s: checkpoint_status(path + s) for s in SUFFIXES if os.path.lexists(path + s)}
    complete = sorted((st, -SUFFIXES.index(s), s) for s, st in status.items() if isinstance(st, int))
    best = complete[-1][2] if complete else None
    prev = next((s for step, _, s in reversed(complete) if step < complete[-1][0]), None)
    for s, st in status.items():
        if s not in (best, prev):
            if not isinstance(st, int):
                fu.print0(f"checkpoint recovery: {st}; removed it")
            remove_checkpoint(path + s)
    if best not in (None, ""):
        if os.path.lexists(path):  # it is prev: it becomes the fallback, unless best sits there
            if best == ".old":
                remove_checkpoint(path)
            else:
                os.replace(path, path + ".old")
                fu.fault_point("to_old")
        os.replace(path + best, path)
        fsync_path(os.path.dirname(path) or ".")
        fu.fault_point("to_new")
    if prev == ".tmp":
        os.replace(path + ".tmp", path + ".old")
        fsync_path(os.path.dirname(path) or ".")
    return (complete[-1][0], best) if complete else (None, "")


def resume_or_fresh(path: str, resume: str, overwrite: bool, script: str) -> bool:
    """--resume no|auto|yes and --overwrite (docs/checkpoints.md), decided on rank 0 and shared: True to
    resume from the checkpoint at `path` (recovered first), False to start fresh. One line and exit 1
    when the flags and the folder disagree, or the only checkpoint is corrupted; never a silent restart."""
    err, step = "", None
    if fu.rank() == 0:
        names = "/".join(os.path.basename(path) + s for s in SUFFIXES)
        status = {s: checkpoint_status(path + s) for s in SUFFIXES if os.path.lexists(path + s)}
        steps = [st for st in status.values() if isinstance(st, int)]
        corrupted = [st for s, st in status.items()  # a manifest but bad files: damaged after its save
                     if isinstance(st, str) and os.path.exists(os.path.join(path + s, MANIFEST))]
        if resume not in ("no", "auto", "yes"):
            err = f"--resume must be no, auto or yes, got {resume!r}"
        elif overwrite and resume != "no":
            err = f"--overwrite starts afresh; it contradicts --resume {resume}"
        elif overwrite:
            for s in status:
                remove_checkpoint(path + s)
                fu.print0(f"--overwrite: removed {path + s}")
        elif resume == "no" and (steps or corrupted):
            err = (f"{os.path.dirname(path) or '.'} holds a checkpoint" + (f" (step {max(steps)})" if steps else "")
                   + "; continue it with --resume auto, or start over with --overwrite (deletes it and metrics.jsonl)")
        elif resume != "no" and corrupted and not steps:
            err = f"{corrupted[0]}; no complete checkpoint to fall back to (--overwrite starts over)"
        elif resume != "no":
            step, source = recover_checkpoint(path)
            if step is None and resume == "yes":
                err = f"--resume yes: no checkpoint in {os.path.dirname(path) or '.'} ({names})"
            elif step is None:
                fu.print0(f"--resume auto: no checkpoint in {os.path.dirname(path) or '.'}, starting fresh")
            elif source:
                fu.print0(f"{path + source} (complete, step {step}) promoted to {path}")
    err, step = fu.broadcast_object((err, step))
    if err:  # one line (not one per rank), out before any rank exits: torchrun then stops the others
        if fu.rank() == 0:
            print(f"{script}: {err}", file=sys.stderr, flush=True)
        fu.barrier()
        sys.exit(1)
    return step is not None


def save_checkpoint(path: str, tok, state: dict, trained: dict):
    """A resumable checkpoint: trained = {"policy": (model, optimizer), and e.g. "critic": (value model,
    optimizer)}. The policy goes at the top level (HF format, loadable on its own), every other model in
    a subfolder of its name (value model format); trainer_state.pt holds `state` (step, KL β, ...) and
    every optimizer's full state. Every random draw is a function of the step, so this is all a resumed
    run needs. Written into path.tmp, marked complete by its manifest, then swapped in by
    recover_checkpoint (the previous one becomes path.old). A collective under FSDP."""
    sds = {name: fu.full_state_dict(m) for name, (m, _) in trained.items()}
    osds = {name: fu.full_optim_state_dict(m, o) for name, (m, o) in trained.items()}
    # recovery first: afterwards path.tmp does not exist; skipped if `path` holds this step (a rerun's final save)
    if fu.rank() == 0 and recover_checkpoint(path)[0] != state["step"]:
        fu.write_hf(trained["policy"][0], tok, path + ".tmp", sds["policy"])
        fu.fault_point("weights")
        for name, (m, _) in trained.items():
            if name != "policy":
                write_value_model(m, tok, os.path.join(path + ".tmp", name), sds[name], f"{name}_config.json",
                                  {"role": name})
        torch.save({**state, "optimizers": osds}, os.path.join(path + ".tmp", "trainer_state.pt"))
        write_manifest(path + ".tmp", state["step"])
        recover_checkpoint(path)  # the swap: path -> path.old, path.tmp -> path, the older path.old deleted
    fu.barrier()


def load_checkpoint(path: str, state: dict, trained: dict):
    """Inverse of save_checkpoint for the optimizers and `state` (the models were loaded from the
    folder already). Rank 0 reads the file; optimizer state is sharded out from its full copy."""
    st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False) if fu.rank() == 0 else {}
    osds = st.pop("optimizers", {})  # stays on rank 0: sharded out tensor by tensor, not pickled to every rank
    state.update(fu.broadcast_object(st))
    for name, (m, o) in trained.items():
        fu.load_full_optim_state_dict(m, o, osds.get(name, {}))
