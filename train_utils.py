"""train_utils.py — what every training script needs around its algorithm: seeds, the learning-rate
schedule, checks, and metric I/O. No model, data or algorithm code lives here.

  1. Seeds: seed_for (every random draw of a run comes from --seed, a purpose, the step and the rank),
     torch_rng / python_rng, seed_everything.
  2. Schedule and checks: lr_at (warmup + cosine), check_batch_sizes, ConfigError (a bad flag),
     NonFiniteError and check_finite (the NaN/inf guard).
  3. Config and metric I/O: parse_config (the flat @dataclass Config from the command line),
     write_json / append_jsonl (rank 0 writes), start_metrics, step_row (one metrics.jsonl row, reduced
     over ranks), finish (summary.json), and memory readings (peak RSS on CPU, max allocated on CUDA).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource

import torch
import transformers

import fsdp_utils as fu

# ----------------------------------------------------------------------------------------------
# 1. Seeds


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


# ----------------------------------------------------------------------------------------------
# 2. Schedule and checks

def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class ConfigError(ValueError):
    """A flag value that cannot work (the scripts print it as one line and exit 1)."""


def check_batch_sizes(batch_size: int, minibatch_size: int, micro_batch_size: int, world: int):
    """Rollout batch -> minibatches -> per-rank micro-batches must divide evenly."""
    for name, value in (("batch_size", batch_size), ("minibatch_size", minibatch_size)):
        if value % world:
            raise ConfigError(f"--{name} {value} must be divisible by the {world} processes")
    mb_rank = minibatch_size // world
    if batch_size % minibatch_size or mb_rank % min(micro_batch_size, mb_rank):
        raise ConfigError("batch_size must be a multiple of minibatch_size, and minibatch_size/world "
                          "of micro_batch_size")


def check_choice(name: str, value: str, choices: tuple):
    """A flag that takes one of a few words."""
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")


class NonFiniteError(RuntimeError):
    """A NaN or inf in a loss, an advantage or a gradient norm: the run stops (without saving)."""


def check_finite(x, what: str, step: int):
    """Raise NonFiniteError naming the step and the quantity if x has a NaN or inf (a CPU-GPU sync).
    Call it on quantities that are the same on every rank (all-reduced or derived from global
    statistics), so that every rank stops at the same point instead of one of them waiting in a collective."""
    if not torch.isfinite(torch.as_tensor(x)).all():
        raise NonFiniteError(f"step {step}: non-finite {what}; stopped without saving this step")


# ----------------------------------------------------------------------------------------------
# 3. Config and metric I/O

def parse_config(cls, argv=None):
    """Parse a flat @dataclass Config from the command line (--field value)."""
    return transformers.HfArgumentParser(cls).parse_args_into_dataclasses(args=argv)[0]


def write_json(path: str, obj: dict):
    """Rank 0 writes a JSON file (train_config.json, summary.json)."""
    if fu.rank() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


def append_jsonl(path: str, row: dict):
    """Rank 0 appends one line to metrics.jsonl."""
    if fu.rank() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def start_metrics(out_dir: str, config: dict, keep: bool = False) -> str:
    """Write train_config.json (config.json is the model's, as HF loaders require) and return the
    path of metrics.jsonl, emptied unless keep (a resumed run appends to it)."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "train_config.json"), config)
    path = os.path.join(out_dir, "metrics.jsonl")
    if fu.rank() == 0 and os.path.exists(path) and not keep:
        os.remove(path)
    return path


def mean_of(values: dict) -> dict:
    """Per-key means of lists of 0-d tensors (the per-micro-batch statistics of a step): one stack,
    one CPU-GPU sync (.tolist()), then python means."""
    keys = [k for k in values if values[k]]
    vals = [torch.as_tensor(v).detach().double().reshape(()) for k in keys for v in values[k]]
    flat = torch.stack([v.to(vals[0].device) for v in vals]).tolist() if vals else []  # CPU-GPU sync
    out, i = {}, 0
    for k in keys:
        n = len(values[k])
        out[k] = sum(flat[i:i + n]) / n
        i += n
    return out


def step_row(m: dict, device, **extra) -> dict:
    """One metrics.jsonl row: per-rank scalars (numbers or 0-d tensors) averaged over ranks (one
    all-reduce, one CPU-GPU sync), then the rank-0 extras and the peak memory."""
    m = fu.reduce_metrics(m, device)
    m.update(extra)
    m["memory/peak_gb"] = peak_memory(device) / 2**30
    return m


def finish(out_dir: str, summary: dict):
    """Write summary.json and print it on one line."""
    write_json(os.path.join(out_dir, "summary.json"), summary)
    fu.print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                         if isinstance(v, (int, float, str))))


def current_memory(device: torch.device) -> int:
    """Bytes in use now: CUDA allocated on GPU; on CPU the process's resident set (VmRSS)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_memory(device: torch.device):
    """Start a new peak: CUDA's peak counters, or on Linux the process's VmHWM (clear_refs 5), so that
    e.g. the training steps' peak can be read apart from the loading peak before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA max allocated on GPU; on CPU the process's peak RSS (VmHWM; not ru_maxrss,
    which Linux inherits from the parent at fork, so a child of a big process would report its size)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc (not Linux)
