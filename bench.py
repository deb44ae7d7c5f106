"""bench.py — peak memory and step time of one DVPO step vs one PPO step vs one GRPO step at equal work
(equal samples per step): a much shorter version of dvpo.py / ppo_baseline.py / grpo_baseline.py. The same
loaders and the same three calls as their training loops (model.rollout -> score -> update), no data, no
evaluation, no saving.

What is measured (each method in fresh processes, so peaks never mix; --repeats R alternating which
method goes first, medians reported):
  1. Step = rollout (fixed length: EOS masked until response_len) -> score (frozen forwards; DVPO:
     old + ref + GVM, PPO: old + ref + RM + critic, GRPO: old + ref + RM) -> update (E epochs ×
     minibatches of policy fwd/bwd + AdamW; PPO: + critic fwd/bwd + AdamW). Random prompts (GRPO:
     batch_size / group_size prompts, each group_size times); a random-init preset written to disk once, or
     --model; GVM / RM / critic are its backbone + a value head, loaded as the scripts do.
  2. Memory per rank, loading and steps apart. CPU: peak RSS (VmHWM) minus the RSS after imports, process
     group and tokenizer ("net"), of one extra run per method with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors
     leave the RSS). CUDA: max_memory_allocated. Every rank also reports its shard bytes and largest tensor.
Analytic model printed beside it (N_π policy and reference parameters, N_v GVM / RM / critic):
  3. State per rank: trained T = 4 w + 4 grad + 8 AdamW = 16 B, frozen F = 4 (bf16: 2), both /world
     under FSDP2: DVPO = T·N_π + F·(N_π + N_v), PPO = T·(N_π + N_v) + F·(N_π + N_v); equal sizes:
     (T + 2F)/(2T + 2F) = 0.60. Per phase, beyond the state: the logits of one micro-batch (logits_bytes),
     the KV cache of a generation batch (kv_cache_bytes); composed with activations, gathered parameters and
     gradients into per-phase peaks by scripts/projection.py (per_rank_memory; `--bench bench.json`).
  4. FLOPs, D = B·(P + T) tokens: forward 2·N·D, forward+backward 6·N·D, generation 2·N_π·D.
     In forward units (equal sizes, E epochs): DVPO = 1 + 3 + 3E, PPO = 1 + 4 + 6E -> E = 4: 16/29.
     GRPO at equal samples per step is DVPO's count and state (a frozen RM instead of a frozen GVM; the paper's
     Table 6: "n× generation" is per prompt, not per sample); ReMax adds one greedy response per prompt.

Launch (docs/performance.md has the measured tables):
  python bench.py --preset 50m                          # CPU: ~50M-parameter Llama shapes, every method
  python bench.py --preset 50m --methods dvpo,ppo       # two of them
  python bench.py --preset 50m --processes 2            # FSDP2 under torchrun: per-rank figures
  torchrun --nproc_per_node 8 bench.py --preset 1b      # CUDA: rank 0 relaunches torchrun per measurement
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

import dvpo
import fsdp_utils as fu
import grpo_baseline
import model
import ppo_baseline
import task
import train_utils as tu


@dataclass
class Config:
    method: str = "all"  # all: each of --methods in fresh processes, compared; dvpo | ppo | grpo: one measurement
    methods: str = "dvpo,ppo,grpo"  # the methods compared (dvpo and ppo always: the ratios are DVPO/PPO)
    group_size: int = 4  # GRPO: responses per prompt (batch_size / group_size prompts per rollout)
    preset: str = "50m"  # model shape (PRESETS; char vocab of 100, random init); ignored with --model
    model: str = ""  # a real checkpoint instead of a preset: ref, GVM, RM and critic are built from it
    batch_size: int = 8  # responses per rollout, global
    minibatch_size: int = 8  # sequences per optimizer step, global
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    prompt_len: int = 32  # tokens per prompt (random tokens, all the same length)
    response_len: int = 32  # generated tokens per response, always exactly this many (EOS masked)
    ppo_epochs: int = 4
    warmup: int = 1  # untimed steps first (allocates AdamW state, warms kernels)
    steps: int = 2  # timed steps per measurement
    repeats: int = 3  # measurements per method, each a fresh process; medians are reported
    threads: int = 2  # torch threads in every measurement process
    processes: int = 1  # > 1: each measurement runs under torchrun --nproc_per_node <processes> (FSDP2)
    gradient_checkpointing: bool = False  # on the policy and the critic
    frozen_dtype: str = "auto"  # reference, GVM, RM: auto = bfloat16 on CUDA, float32 on CPU (as the scripts)
    out_dir: str = "out/bench"  # bench.json, and one JSON per measurement process
    result: str = ""  # --method dvpo|ppo|grpo: where to write this measurement's JSON (set by the parent)
    seed: int = 0
    device: str = "auto"


# Llama shapes (num_key_value_heads = num_attention_heads); with a vocab of 100 the blocks hold
# nearly every parameter: 4·H² (attention) + 3·H·I (MLP) per layer.
PRESETS = {
    "tiny": {},  # task.TINY_PRESET: 3 × (H 128, I 384), ~0.6M
    "50m": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=10, num_attention_heads=10),  # 49.7M
    "150m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16),  # 154M
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),  # 1.07B
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24),  # 3.17B
}
PHASES = ("generation", "score", "update")
METHODS = ("dvpo", "ppo", "grpo")
PAPER = {"3B": {"ppo": (41.43, 23), "dvpo": (27.50, 13)}, "8B": {"ppo": (78.96, 70), "dvpo": (60.49, 48)}}  # (GB, s)


# ----------------------------------------------------------------------------------------------
# Analytic model: bytes per parameter and FLOPs per phase (pure functions)

def bytes_per_param(world: int = 1, frozen_bytes: float = 4) -> tuple[float, float]:
    """(T, F) bytes per parameter on one device, trained and frozen, as this repo holds them:
    T = fp32 weights 4 + grads 4 + AdamW exp_avg 4 + exp_avg_sq 4 = 16; F = frozen_bytes. FSDP2
    (world > 1) shards weights, grads and optimizer state alike, so both divide by world."""
    return 16 / world, frozen_bytes / world


def deepspeed_bytes_per_param(stage: int, world: int) -> tuple[float, float]:
    """(T, F) of the paper's DeepSpeed setups (bf16 weights and grads, fp32 master + AdamW = 12 B).
    ZeRO-1 shards only the 12 B: T = 2 + 2 + 12/world, frozen bf16 replicated F = 2.
    ZeRO-3 shards everything: T = 16/world, F = 2/world."""
    return (4 + 12 / world, 2.0) if stage == 1 else (16 / world, 2 / world)


def model_memory(method: str, n_policy: int, n_value: int, T: float, F: float) -> float:
    """Bytes of model state per device (activations left out).
      dvpo: T·N_π (policy) + F·N_π (reference) + F·N_v (GVM)
      ppo : T·N_π (policy) + T·N_v (critic) + F·N_π (reference) + F·N_v (reward model)"""
    trained = n_policy + (n_value if method == "ppo" else 0)
    return T * trained + F * (n_policy + n_value)


def logits_bytes(micro: int, response_len: int, vocab: int, a: int, grad: bool) -> float:
    """Peak bytes of model.response_logprobs' logits for one micro-batch of `micro` rows of T = response_len
    tokens (the rollout layout: the LM head scores only the T+1 last positions), a = bytes of the model's
    dtype (4 fp32, 2 bf16):
      K = micro·(T+1)·V                       the LM head's output, a·K, kept for the backward
      E = micro·c·V, c = min(T, max(1, LOGITS_CHUNK // (micro·V)))   one chunk, log-softmax in fp32
      no grad (frozen forwards, evaluation):  a·K + (a + 8)·E     (the chunk gathered, x/temperature, log-softmax)
      grad (the update, entropy logged):      max(a·K + (a + 12)·E,  (2 + [T > c])·a·K + 8·E)
        forward: the chunk, log-softmax, its exp and their product (the entropy); backward: the logits, their
        gradient and, with several chunks, each chunk's gather backward (a zeros tensor of the logits' shape
        that is then added into the gradient), beside one chunk's fp32 gradients."""
    K = micro * (response_len + 1) * vocab
    c = min(response_len, max(1, model.LOGITS_CHUNK // (micro * vocab)))
    E = micro * c * vocab
    if not grad:
        return a * K + (a + 8) * E
    return max(a * K + (a + 12) * E, (2 + (response_len > c)) * a * K + 8 * E)


def kv_cache_bytes(rows: int, seq_len: int, layers: int, kv: int, a: int) -> float:
    """Bytes of the KV cache of `rows` sequences of seq_len tokens (prompt + generated): keys and values of
    every layer, kv = num_key_value_heads · head_dim values each, a bytes: rows·seq_len·layers·2·kv·a.
    model.generate holds it for the whole batch it samples: the rollout batch per rank, and in the held-out
    evaluation --eval_batch_size prompts at a time."""
    return rows * seq_len * layers * 2 * kv * a


def step_flops(method: str, n_policy: int, n_value: int, tokens: int, ppo_epochs: int) -> dict:
    """FLOPs of one step by phase, 2·N·D per forward and 6·N·D per forward+backward (D = tokens of
    the global batch; attention's O(L²) term and the O(N) optimizer left out).
      generation: 2·N_π·D (a KV cache runs each token through the policy once)
      score: dvpo old + ref + GVM = 2·D·(2N_π + N_v); ppo: + critic = 2·D·(2N_π + 2N_v)
      update: E·6·N_π·D; ppo: + E·6·N_v·D (the critic)"""
    ppo = method == "ppo"
    return {"generation": 2 * n_policy * tokens,
            "score": 2 * tokens * (2 * n_policy + (2 if ppo else 1) * n_value),
            "update": ppo_epochs * 6 * tokens * (n_policy + (n_value if ppo else 0))}


def analytic(n_policy: int, n_value: int, tokens: int, ppo_epochs: int, world: int, frozen_bytes: float = 4) -> dict:
    """The analytic DVPO/PPO ratios: memory from model_memory, time floors from step_flops."""
    T, F = bytes_per_param(world, frozen_bytes)
    mem = {m: model_memory(m, n_policy, n_value, T, F) for m in METHODS}  # grpo: dvpo's (a frozen RM for the GVM)
    fl = {m: step_flops(m, n_policy, n_value, tokens, ppo_epochs) for m in METHODS}
    no_gen = {m: fl[m]["score"] + fl[m]["update"] for m in fl}
    return {"bytes_per_param": {"trained": T, "frozen": F}, "memory_bytes": mem, "flops": fl,
            "memory_ratio": mem["dvpo"] / mem["ppo"],
            "time_ratio": sum(fl["dvpo"].values()) / sum(fl["ppo"].values()),
            "time_ratio_excl_generation": no_gen["dvpo"] / no_gen["ppo"],
            "phase_ratio": {k: fl["dvpo"][k] / fl["ppo"][k] for k in PHASES}}


# ----------------------------------------------------------------------------------------------
# Measurement: models as the scripts load them, one timed step, one method per process

def write_preset(cfg: Config) -> str:
    """A random-init preset model + tokenizer in HF format (once), so every measurement loads its
    models from disk exactly as the training scripts do."""
    path = os.path.join(cfg.out_dir, f"model_{cfg.preset}")
    if not os.path.exists(os.path.join(path, "config.json")):
        tok = task.build_char_tokenizer()
        task.build_tiny_model(tok, seed=cfg.seed, **PRESETS[cfg.preset]).save_pretrained(path)
        tok.save_pretrained(path)
    return path


def load_models(path: str, method: str, gradient_checkpointing: bool, device, frozen_dtype: torch.dtype) -> dict:
    """policy (trained), ref (frozen) and, per method, gvm (frozen), rm (frozen) + critic (trained), or rm."""
    models = {"policy": model.load_policy(path, device)[0],
              "ref": model.load_policy(path, device, dtype=frozen_dtype, frozen=True)[0]}
    for name in {"dvpo": ("gvm",), "ppo": ("rm", "critic"), "grpo": ("rm",)}[method]:
        models[name] = (model.new_value_model(path, device) if name == "critic" else
                        model.new_value_model(path, device, dtype=frozen_dtype, frozen=True))
    for name, m in models.items():  # the trained ones in train mode, as the scripts set them (HF checkpoints only then)
        if m.train(name in ("policy", "critic")).training and gradient_checkpointing:
            (m.backbone if name == "critic" else m).gradient_checkpointing_enable()
    return models


def clock(device) -> float:
    """time.perf_counter once the device has finished its queued work (CUDA kernels are async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a CPU-GPU sync point, for timing only
    return time.perf_counter()


def rl_step(method: str, models: dict, opts: dict, prompts: list, tok, acfg, device, step: int, opt_step: int):
    """One step of dvpo.main / ppo_baseline.main / grpo_baseline.main, timed by phase: rollout -> score -> update.
    Returns ({phase: seconds, total, cpu_total}, new optimizer-step count)."""
    t0, cpu0 = clock(device), time.process_time()  # CPU seconds: less sensitive to other tenants
    gen = tu.torch_rng(acfg.seed, "rollout", step, fu.rank(), device=device)
    batch = model.rollout(models["policy"], prompts, tok, acfg.max_new_tokens, acfg.temperature, acfg.top_p, gen,
                       device, min_new_tokens=acfg.max_new_tokens)  # fixed length: both methods do the same work
    t1 = clock(device)
    if method == "dvpo":
        sc = dvpo.score(models["policy"], models["ref"], models["gvm"], batch, [[] for _ in prompts], acfg.kl_beta,
                        1.0, acfg, tok.pad_token_id, device)
        t2 = clock(device)
        _, opt_step = dvpo.update(models["policy"], opts["policy"], batch, sc, acfg, step, opt_step)
    elif method == "ppo":
        sc = ppo_baseline.score(models["policy"], models["ref"], models["rm"], models["critic"], batch,
                                acfg.kl_beta, 1.0, acfg, device)
        t2 = clock(device)
        _, opt_step = ppo_baseline.update(models["policy"], models["critic"], opts["policy"], opts["critic"], batch,
                                          sc, acfg, step, opt_step)
    else:  # grpo: the prompts arrive as groups of group_size consecutive copies
        sc = grpo_baseline.score(models["policy"], models["ref"], models["rm"], batch, None, acfg.kl_beta, 1.0, acfg,
                                 device)
        t2 = clock(device)
        _, opt_step = grpo_baseline.update(models["policy"], opts["policy"], batch, sc, acfg, step, opt_step)
    t3 = clock(device)
    return {"generation": t1 - t0, "score": t2 - t1, "update": t3 - t2, "total": t3 - t0,
            "cpu_total": time.process_time() - cpu0}, opt_step


def measure(cfg: Config) -> dict:
    """One method: baseline memory, models, warmup + timed steps; per-rank peaks gathered to rank 0,
    which writes the result to cfg.result."""
    device = fu.setup(cfg.device)
    torch.set_num_threads(cfg.threads)
    tu.seed_everything(cfg.seed)
    world, path = fu.world(), cfg.model or os.path.join(cfg.out_dir, f"model_{cfg.preset}")
    if not cfg.model and fu.rank() == 0:
        write_preset(cfg)  # normally done by the parent already
    fu.barrier()
    if cfg.method not in METHODS:
        sys.exit(f"bench.py: --method must be all, {', '.join(METHODS)}, got {cfg.method!r}")
    script = {"dvpo": dvpo, "ppo": ppo_baseline, "grpo": grpo_baseline}[cfg.method]
    extra = {"group_size": cfg.group_size} if cfg.method == "grpo" else {}
    algo = script.Config(
        model=path, steps=cfg.warmup + cfg.steps, batch_size=cfg.batch_size, minibatch_size=cfg.minibatch_size,
        micro_batch_size=cfg.micro_batch_size, ppo_epochs=cfg.ppo_epochs, max_new_tokens=cfg.response_len,
        lr=1e-6, seed=cfg.seed, **extra)  # the scripts' own hyperparameters otherwise (clip ε, β, γ, λ, ...)
    tu.check_batch_sizes(algo.batch_size, algo.minibatch_size, algo.micro_batch_size, world)
    tok = model.load_tokenizer(path)
    with torch.device("meta"):  # import the model's Python code now (~120 MB for Llama): that is not model memory
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    base = tu.current_memory(device)  # after imports, process group and tokenizer; before any model exists
    tu.reset_peak_memory(device)  # from here on: the loading peak
    models = load_models(path, cfg.method, cfg.gradient_checkpointing, device,
                         model.frozen_dtype(cfg.frozen_dtype, device))
    opts = {n: torch.optim.AdamW(models[n].parameters(), lr=algo.lr, weight_decay=0.0)
            for n in ("policy", "critic") if n in models}
    loaded, load_peak = tu.current_memory(device), tu.peak_memory(device)
    tu.reset_peak_memory(device)  # from here on: the steps' peak
    n = cfg.group_size if cfg.method == "grpo" else 1  # GRPO: B / n prompts, each sampled n times
    prompts = [p for p in tok_prompts(tok, cfg.batch_size // world // n, cfg.prompt_len, cfg.seed + 1 + fu.rank())
               for _ in range(n)]
    steps, opt_step = [], 0
    for step in range(cfg.warmup + cfg.steps):
        ph, opt_step = rl_step(cfg.method, models, opts, prompts, tok, algo, device, step, opt_step)
        steps += [ph] if step >= cfg.warmup else []
        fu.print0(f"{cfg.method} step {step + 1}/{cfg.warmup + cfg.steps}{' (warmup)' if step < cfg.warmup else ''}: "
                  f"{ph['total']:.2f} s | " + " | ".join(f"{k} {ph[k]:.2f}" for k in PHASES))
    tensors = [t for m in models.values() for t in [*m.parameters(), *m.buffers()]]  # this rank's shards, the largest
    shards = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)  # tensor (its load transient)
    per_rank = fu.all_gather_object({"step_peak": tu.peak_memory(device) - base, "load_peak": load_peak - base,
                                     "loaded": loaded - base, "base": base, "shards": shards,
                                     "largest_tensor": max(t.numel() * t.element_size() for t in tensors)})
    result = {"method": cfg.method, "device": str(device), "world": world, "threads": cfg.threads,
              "params": {"policy": n_params(models["policy"]), "value": n_params(models.get("gvm", models.get("rm")))},
              "peak_memory_bytes": max(r["step_peak"] for r in per_rank),
              "load_peak_bytes": max(r["load_peak"] for r in per_rank),
              "models_bytes": max(r["loaded"] for r in per_rank), "per_rank": per_rank,
              "step_times_s": [s["total"] for s in steps], "step_cpu_s": [s["cpu_total"] for s in steps],
              "phases": steps}
    fu.print0(f"{cfg.method}: step peak {result['peak_memory_bytes'] / 2**30:.3f} GiB net per rank, load peak "
              f"{result['load_peak_bytes'] / 2**30:.3f} GiB | step {statistics.median(result['step_times_s']):.2f} s")
    if cfg.result:
        tu.write_json(cfg.result, result)
    fu.cleanup()
    return result


def n_params(model) -> int:
    """Parameters of a (possibly sharded) model: DTensors report their global shape."""
    return sum(p.numel() for p in model.parameters())


def tok_prompts(tok, n: int, length: int, seed: int) -> list[list[int]]:
    """n prompts of exactly `length` random non-special token ids."""
    ids = [i for i in range(len(tok)) if i not in set(tok.all_special_ids)]
    pick = torch.randint(len(ids), (n, length), generator=torch.Generator().manual_seed(seed))
    return [[ids[j] for j in row] for row in pick.tolist()]


# ----------------------------------------------------------------------------------------------
# main: fresh processes per method and repeat, then medians, ratios, the analytic model, a table

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: Config, method: str, nproc: int, result: str, mmap_malloc: bool = False) -> dict:
    """`bench.py --method <method>` in a fresh process (torchrun when nproc > 1); its result. Threads
    pinned and idle OpenMP threads asleep (OMP_WAIT_POLICY=PASSIVE: on this shared 2-core machine
    spinning threads ran 25× slower); mmap_malloc: glibc returns freed blocks ≥ 64 KiB, so the RSS
    follows the live tensors (the timed runs keep the default: page faults cost time)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(cfg.threads), OMP_WAIT_POLICY=env.get("OMP_WAIT_POLICY", "PASSIVE"))
    if mmap_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    args = [f"--{k}={v}" for k, v in asdict(cfg).items() if k not in ("method", "result", "processes")]
    cmd = [sys.executable, os.path.abspath(__file__)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), os.path.abspath(__file__)]
    p = subprocess.run(cmd + args + [f"--method={method}", f"--result={result}"], env=env)
    if p.returncode:
        sys.exit(f"bench.py: the {method} measurement failed (exit {p.returncode})")
    with open(result) as f:
        return json.load(f)


def summarize(runs: list[dict], mem: list[dict]) -> dict:
    """One method: memory from its memory runs (CPU) or the timed runs (CUDA), medians over repeats
    of each repeat's median step time and mean phase times."""
    med = statistics.median
    return {"peak_memory_bytes": med(r["peak_memory_bytes"] for r in mem),
            "load_peak_bytes": med(r["load_peak_bytes"] for r in mem),
            "models_bytes": med(r["models_bytes"] for r in mem), "per_rank": mem[0]["per_rank"],
            "peak_memory_default_malloc_bytes": med(r["peak_memory_bytes"] for r in runs),
            "step_time_s": med(med(r["step_times_s"]) for r in runs),
            "step_cpu_s": med(med(r["step_cpu_s"]) for r in runs),
            "phases": {k: med(statistics.mean(s[k] for s in r["phases"]) for r in runs) for k in PHASES},
            "repeats": runs, "memory_runs": mem}


def table(res: dict) -> str:
    """Markdown table: each method, measured DVPO/PPO (and GRPO/PPO), analytic DVPO/PPO (GRPO's is the same)."""
    a, GB = res["analytic"], 2**30
    methods = [m for m in METHODS if m in res]
    rows = [("step peak memory per rank, net (GiB)", {m: res[m]["peak_memory_bytes"] / GB for m in methods},
             a["memory_ratio"]),
            ("loading peak per rank, net (GiB)", {m: res[m]["load_peak_bytes"] / GB for m in methods}, None),
            ("models loaded per rank, net (GiB)", {m: res[m]["models_bytes"] / GB for m in methods}, None),
            ("analytic model state per rank (GiB)", {m: a["memory_bytes"][m] / GB for m in methods},
             a["memory_ratio"]),
            ("step time, median (s)", {m: res[m]["step_time_s"] for m in methods}, a["time_ratio"]),
            ("step CPU time, median (s)", {m: res[m]["step_cpu_s"] for m in methods}, a["time_ratio"])]
    rows += [(f"· {k} (s)", {m: res[m]["phases"][k] for m in methods}, a["phase_ratio"][k]) for k in PHASES]
    rows.append(("step time − generation (s)",
                 {m: res[m]["step_time_s"] - res[m]["phases"]["generation"] for m in methods},
                 a["time_ratio_excl_generation"]))
    ratios = [m for m in methods if m != "ppo"]
    out = ["| | " + " | ".join(m.upper() for m in methods) + " | " + " | ".join(f"{m.upper()}/PPO" for m in ratios)
           + " | analytic DVPO/PPO |", "|---" * (len(methods) + len(ratios) + 2) + "|"]
    for name, v, an in rows:
        out.append(f"| {name} | " + " | ".join(f"{v[m]:.2f}" for m in methods) + " | "
                   + " | ".join(f"{v[m] / v['ppo']:.3f}" for m in ratios) + f" | {'' if an is None else f'{an:.3f}'} |")
    return "\n".join(out)


def main(cfg: Config) -> dict:
    if int(os.environ.get("RANK", 0)) > 0:
        return {}  # launched by torchrun: rank 0 relaunches torchrun for each measurement
    nproc = int(os.environ.get("WORLD_SIZE", cfg.processes))
    if cfg.repeats < 1 or cfg.steps < 1:
        sys.exit("bench.py: --repeats and --steps must be >= 1")
    if not cfg.model and (cfg.preset not in PRESETS or cfg.prompt_len + cfg.response_len > 512):
        sys.exit(f"bench.py: --preset must be one of {', '.join(PRESETS)}, with prompt_len + response_len <= 512")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if not cfg.model:
        write_preset(cfg)
    asked = cfg.methods.split(",")
    if set(asked) - set(METHODS) or not {"dvpo", "ppo"} <= set(asked):
        sys.exit(f"bench.py: --methods must name dvpo, ppo and optionally grpo, got {cfg.methods!r}")
    if "grpo" in asked and cfg.batch_size % (cfg.group_size * nproc):
        sys.exit(f"bench.py: --batch_size {cfg.batch_size} must be a multiple of --group_size {cfg.group_size} × "
                 f"{nproc} processes")
    methods = [m for m in METHODS if m in asked]
    runs = {m: [] for m in methods}
    for r in range(cfg.repeats):
        for method in (methods if r % 2 == 0 else methods[::-1]):  # alternate who goes first
            res = launch(cfg, method, nproc, os.path.join(cfg.out_dir, f"r{r}_{method}.json"))
            runs[method].append(res)
            print(f"repeat {r + 1}/{cfg.repeats} {method}: step peak {res['peak_memory_bytes'] / 2**30:.3f} GiB | "
                  f"step {statistics.median(res['step_times_s']):.2f} s", flush=True)
    mem = runs  # CUDA: max_memory_allocated counts live tensors already
    if runs["dvpo"][0]["device"] == "cpu":  # one more short run per method whose RSS follows the live tensors
        mem = {m: [launch(replace(cfg, steps=1), m, nproc, os.path.join(cfg.out_dir, f"memory_{m}.json"), True)]
               for m in methods}

    first = runs["dvpo"][0]
    n_pi, n_v = first["params"]["policy"], first["params"]["value"]
    res = {m: summarize(runs[m], mem[m]) for m in methods}
    res["analytic"] = analytic(n_pi, n_v, cfg.batch_size * (cfg.prompt_len + cfg.response_len), cfg.ppo_epochs, nproc,
                               model.frozen_dtype(cfg.frozen_dtype, torch.device(first["device"])).itemsize)
    d, p = res["dvpo"], res["ppo"]
    res.update({"ratio/memory": d["peak_memory_bytes"] / p["peak_memory_bytes"],
                "ratio/step_time": d["step_time_s"] / p["step_time_s"],
                "ratio/step_time_excl_generation": ((d["step_time_s"] - d["phases"]["generation"]) /
                                                    (p["step_time_s"] - p["phases"]["generation"])),
                "ratio/cpu_time": d["step_cpu_s"] / p["step_cpu_s"],
                "ratio/step_time_per_repeat": [statistics.median(a["step_times_s"]) /
                                               statistics.median(b["step_times_s"])
                                               for a, b in zip(runs["dvpo"], runs["ppo"])],
                **({"ratio/grpo_memory": res["grpo"]["peak_memory_bytes"] / p["peak_memory_bytes"],
                    "ratio/grpo_step_time": res["grpo"]["step_time_s"] / p["step_time_s"],
                    "ratio/grpo_dvpo_step_time": res["grpo"]["step_time_s"] / d["step_time_s"]}
                   if "grpo" in res else {}),
                "analytic/memory_ratio": res["analytic"]["memory_ratio"],
                "analytic/time_ratio": res["analytic"]["time_ratio"],
                "preset": "" if cfg.model else cfg.preset, "model": cfg.model, "params": {"policy": n_pi, "value": n_v},
                "threads": cfg.threads, "nproc": nproc, "device": first["device"], "torch": torch.__version__,
                "config": asdict(cfg), "paper": PAPER})
    tu.write_json(os.path.join(cfg.out_dir, "bench.json"), res)
    print(f"\n{cfg.model or cfg.preset}: policy {n_pi / 1e6:.1f}M params, GVM/RM/critic {n_v / 1e6:.1f}M | batch "
          f"{cfg.batch_size}, prompt {cfg.prompt_len} + response {cfg.response_len} tokens, {cfg.ppo_epochs} epochs | "
          f"{first['device']} × {nproc}, {cfg.threads} threads | medians of {cfg.repeats} repeats × {cfg.steps} "
          "steps\n")
    print(table(res))
    print(f"\nstep time DVPO/PPO per repeat: {', '.join(f'{x:.3f}' for x in res['ratio/step_time_per_repeat'])}\n"
          f"per rank, and the analytic per-rank model: python scripts/projection.py --bench {cfg.out_dir}/bench.json")
    return res


if __name__ == "__main__":
    cfg = tu.parse_config(Config)
    main(cfg) if cfg.method == "all" else measure(cfg)
