"""bench.py — peak memory and step time of one DVPO step loop vs one PPO step loop, at equal work:
same model shape, batch, prompt length and (fixed) response length, after warmup. A much shorter
version of dvpo.py / ppo_baseline.py: the same imported pieces, no data, no evaluation, no saving.

What is measured (each method in fresh processes, so peaks never mix; --repeats R, alternating
which method goes first, medians reported; the machine may be shared, so loadavg is recorded):
  1. Step = rollout (fixed length: EOS masked until response_len) → frozen forwards (old and ref
     log-probs; DVPO: GVM values, without τ; PPO: RM score + critic values) → advantages → E epochs
     × minibatches of policy fwd/bwd (PPO: + critic fwd/bwd) → grad clip + AdamW step(s). Random
     prompts; random-init presets or a checkpoint whose copies serve as ref / GVM / RM / critic.
  2. Memory per device. CPU: peak RSS (VmHWM) minus the RSS after imports, process group and
     tokenizer, before any model exists ("net"); VmHWM rather than ru_maxrss, because Linux's
     ru_maxrss also keeps the parent's RSS at fork (measured: a 13 MB child of a 1.5 GB parent
     reports 1.5 GB); ru_maxrss is recorded too. The peak comes from one extra short run per
     method with MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors leave the RSS; the timed runs
     keep glibc's default (faster; their peaks, with freed heap blocks still resident, are reported
     as "default malloc"). See child_env(). CUDA: max_memory_allocated (and reserved) over the
     steps (peak stats reset once the models are built and sharded), max over ranks.

Analytic model printed beside it (N_π policy and reference parameters, N_v GVM/RM/critic):
  3. Bytes per parameter on one device: trained T = 4 w + 4 grad + 8 AdamW (m, v) = 16 (fp32, as
     here; FSDP2 shards all of it: 16/world), frozen F = 4 (fp32; 2 if bf16), /world when sharded.
  4. Memory: DVPO = T·N_π + F·(N_π + N_v);  PPO = T·(N_π + N_v) + F·(N_π + N_v).
     Equal sizes: DVPO/PPO = (T + 2F)/(2T + 2F) = (16 + 8)/(32 + 8) = 0.60 (activations left out).
  5. FLOPs, D = B·(P + T) tokens: a forward is 2·N·D, a forward+backward 6·N·D; generation with a
     KV cache reads every token once, 2·N_π·D. Frozen: DVPO old + ref + GVM = 2D(2N_π + N_v);
     PPO old + ref + RM + critic = 2D(2N_π + 2N_v). Training: E·6·N_π·D (+ E·6·N_v·D PPO critic).
  6. In forward units (2·N·D, equal sizes, E epochs): DVPO = 1 + 3 + 3E, PPO = 1 + 4 + 6E.
     E = 4: 16/29 = 0.552 with generation counted at its FLOPs; 15/28 = 0.536 without it
     (the issue's "16/29 before generation is counted" already counts generation as one forward;
     reusing the sampler's log-probs as old log-probs would give 14/27 = 0.519 without generation).
     E → ∞: 1/2. The optimizer is O(N) (not in the FLOPs): DVPO steps N_π, PPO N_π + N_v.
  7. Paper (Table 3, 8×A100): PPO-3B 41.43 GB 23 s vs DVPO-3B 27.50 GB 13 s (ZeRO-1);
     PPO-8B 78.96 GB 70 s vs DVPO-8B 60.49 GB 48 s (ZeRO-3).

Launch:
  python bench.py --preset 50m                          # CPU: ~50M-parameter Llama shapes, 4 models
  python bench.py --preset tiny --repeats 1 --steps 1   # seconds
  python bench.py --policy <path> --prompt_len 256 --response_len 256 --gradient_checkpointing
  torchrun --nproc_per_node 8 bench.py --preset 1b      # CUDA, FSDP2: rank 0 relaunches torchrun
                                                        # per measurement (same as --processes 8)
  python bench.py --method dvpo --preset 50m            # one measurement in this process
"""
from __future__ import annotations

import copy
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import data
import dvpo
import fsdp_utils as fu
import ppo_baseline
from gvm import GVM


@dataclass
class Config:
    method: str = "both"  # both: run each method in fresh processes and compare; dvpo | ppo: one measurement here
    preset: str = "50m"  # model shape (PRESETS; char vocab of 100, random init); ignored with --policy
    policy: str = ""  # a real checkpoint instead: ref, GVM, RM and critic are copies of it / its backbone
    batch_size: int = 8  # prompts per rollout, global
    minibatch_size: int = 8  # sequences per optimizer step, global
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    prompt_len: int = 32  # tokens per prompt (random tokens, all the same length)
    response_len: int = 32  # generated tokens per response, always exactly this many (EOS masked)
    ppo_epochs: int = 4
    warmup: int = 1  # untimed steps first (allocates AdamW state, warms kernels)
    steps: int = 2  # timed steps per measurement
    repeats: int = 3  # measurements per method, each a fresh process; medians are reported
    threads: int = 2  # torch.set_num_threads in every measurement process (environment: child_env)
    processes: int = 1  # > 1: each measurement runs under torchrun --nproc_per_node <processes> (FSDP2)
    gradient_checkpointing: bool = False  # on the policy and the critic
    lr: float = 1e-6  # AdamW learning rate (irrelevant to cost; small keeps the numbers finite)
    out_dir: str = "out/bench"  # bench.json, and one JSON per measurement process
    result: str = ""  # --method dvpo|ppo: where to write this measurement's JSON (set by the parent)
    seed: int = 0
    device: str = "auto"


# Llama shapes (num_key_value_heads = num_attention_heads). With a vocab of 100 the blocks hold
# nearly every parameter: 4·H² (attention) + 3·H·I (MLP) per layer.
PRESETS = {
    "tiny": {},  # data.TINY_PRESET: 3 × (H 128, I 384), ~0.6M
    "50m": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=10, num_attention_heads=10),  # 49.7M
    "150m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16),  # 154M
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),  # 1.07B
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24),  # 3.17B
}
PHASES = ("generation", "frozen", "advantages", "policy_fwd_bwd", "critic_fwd_bwd", "optimizer")
BATCH_KEYS = ("input_ids", "attention_mask", "prompt_len", "response_len")
ALGO, PPO_ALGO = dvpo.Config(), ppo_baseline.Config()  # the scripts' own hyperparameters (clip ε, β, γ, λ, ...)
PAPER = {"3B": {"ppo": (41.43, 23), "dvpo": (27.50, 13)}, "8B": {"ppo": (78.96, 70), "dvpo": (60.49, 48)}}  # (GB, s/step)


# ----------------------------------------------------------------------------------------------
# Analytic model: bytes per parameter and FLOPs per phase (pure functions)

def bytes_per_param(world: int = 1, frozen_bytes: float = 4) -> tuple[float, float]:
    """(T, F) bytes per parameter on one device, trained and frozen, as this repo holds them:
    T = fp32 weights 4 + fp32 grads 4 + AdamW exp_avg 4 + exp_avg_sq 4 = 16; F = frozen_bytes (4 fp32).
    FSDP2 (world > 1) shards weights, grads and optimizer state alike, so both divide by world
    (bf16 compute on CUDA casts each gathered block transiently; not counted, same in both methods)."""
    return 16 / world, frozen_bytes / world


def deepspeed_bytes_per_param(stage: int, world: int) -> tuple[float, float]:
    """(T, F) of the paper's DeepSpeed setups (bf16 weights and grads, fp32 master + AdamW = 12 B).
    ZeRO-1 shards only the 12 B: T = 2 + 2 + 12/world, frozen bf16 replicated F = 2.
    ZeRO-3 shards everything: T = 16/world, F = 2/world."""
    return (4 + 12 / world, 2.0) if stage == 1 else (16 / world, 2 / world)


def model_memory(method: str, n_policy: int, n_value: int, T: float, F: float) -> float:
    """Bytes of model state per device (the weights-dominated regime: activations left out).
      dvpo: T·N_π (policy) + F·N_π (reference) + F·N_v (GVM)
      ppo : T·N_π (policy) + T·N_v (critic) + F·N_π (reference) + F·N_v (reward model)
    n_policy, n_value: parameters; T, F: bytes per parameter (bytes_per_param)."""
    trained = n_policy + (n_value if method == "ppo" else 0)
    return T * trained + F * (n_policy + n_value)


def step_flops(method: str, n_policy: int, n_value: int, tokens: int, ppo_epochs: int) -> dict:
    """FLOPs of one step by phase, 2·N·D per forward and 6·N·D per forward+backward (N parameters,
    D = tokens = B·(P+T) of the global batch; attention's O(L²) term and the O(N) optimizer are left
    out). Generation with a KV cache runs each token through the policy once: 2·N_π·D.
      frozen: dvpo old + ref (2·2·N_π·D) + GVM (2·N_v·D); ppo: + RM and critic (2·2·N_v·D)
      policy_fwd_bwd: E·6·N_π·D;  critic_fwd_bwd (ppo): E·6·N_v·D
    Returns {phase: FLOPs} with the keys of PHASES that cost FLOPs."""
    ppo = method == "ppo"
    return {"generation": 2 * n_policy * tokens,
            "frozen": 2 * tokens * (2 * n_policy + (2 if ppo else 1) * n_value),
            "policy_fwd_bwd": ppo_epochs * 6 * n_policy * tokens,
            "critic_fwd_bwd": ppo_epochs * 6 * n_value * tokens if ppo else 0}


def analytic(n_policy: int, n_value: int, tokens: int, ppo_epochs: int, world: int) -> dict:
    """The analytic DVPO/PPO ratios (memory from model_memory, time floors from step_flops)."""
    T, F = bytes_per_param(world)
    mem = {m: model_memory(m, n_policy, n_value, T, F) for m in ("dvpo", "ppo")}
    fl = {m: step_flops(m, n_policy, n_value, tokens, ppo_epochs) for m in ("dvpo", "ppo")}
    no_gen = {m: sum(v for k, v in fl[m].items() if k != "generation") for m in fl}
    return {"bytes_per_param": {"trained": T, "frozen": F}, "memory_bytes": mem, "flops": fl,
            "memory_ratio": mem["dvpo"] / mem["ppo"],
            "time_ratio": sum(fl["dvpo"].values()) / sum(fl["ppo"].values()),
            "time_ratio_excl_generation": no_gen["dvpo"] / no_gen["ppo"],
            "phase_ratio": {"generation": 1.0, "frozen": fl["dvpo"]["frozen"] / fl["ppo"]["frozen"],
                            "policy_fwd_bwd": 1.0, "critic_fwd_bwd": 0.0,
                            "optimizer": n_policy / (n_policy + n_value)}}  # AdamW is O(parameters stepped)


# ----------------------------------------------------------------------------------------------
# Measurement helpers: clocks, memory readings, models, prompts

def clock(device) -> float:
    """time.perf_counter once the device has finished its queued work (CUDA kernels are async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a CPU-GPU sync point, for timing only
    return time.perf_counter()


def lap(phases: dict, name: str, t0: float, device) -> float:
    """Add the time since t0 to phases[name]; returns the new start time."""
    t = clock(device)
    phases[name] = phases.get(name, 0.0) + t - t0
    return t


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc/self/statm, field 2, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak RSS of this process since exec (VmHWM). Unlike ru_maxrss it does not include the
    parent's RSS at fork, which Linux carries across exec."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(cfg: Config, tok, method: str, device) -> tuple[dict, dict]:
    """policy (trained), ref (frozen copy) and, per method, gvm (frozen) or rm (frozen) + critic
    (trained): GVM(backbone) with a copy of the policy's backbone. Each copy is sharded as soon as
    it is made, so at most one unsharded copy exists beside the policy. Returns (models, counts)."""
    if cfg.policy:
        policy = AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=torch.float32)
    else:
        policy = data.build_tiny_model(tok, seed=cfg.seed, **PRESETS[cfg.preset])
    names = ("ref", "gvm") if method == "dvpo" else ("ref", "rm", "critic")
    models, counts = {}, {"policy": n_params(policy)}
    for name in names:
        m = copy.deepcopy(policy) if name == "ref" else GVM(copy.deepcopy(policy.base_model))
        if name != "ref":
            counts["value"] = n_params(m)  # GVM, RM and critic: the same shape
        if name == "critic":
            if cfg.gradient_checkpointing:
                m.backbone.gradient_checkpointing_enable()
            m.train()
        else:
            m.requires_grad_(False).eval()
        models[name] = fu.shard(m, device)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    models["policy"] = fu.shard(policy, device).train()
    return models, counts


def make_prompts(tok, n: int, length: int, seed: int) -> list[list[int]]:
    """n prompts of exactly `length` random non-special token ids."""
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    pick = torch.randint(len(ids), (n, length), generator=torch.Generator().manual_seed(seed))
    return [[ids[j] for j in row] for row in pick.tolist()]


# ----------------------------------------------------------------------------------------------
# One RL step, timed by phase: the lines of dvpo.main / ppo_baseline.main ("PPO only" marked)

def rl_step(models: dict, opts: dict, prompts: list, tok, cfg: Config, device, step: int) -> dict:
    """Rollout → frozen forwards → advantages → E epochs × minibatches × micro-batches → AdamW.
    Returns {phase: seconds} (PHASES), "total" (wall) and "cpu_total" (process CPU seconds)."""
    ppo, world, policy = "critic" in models, fu.world(), models["policy"]
    per_rank, mb_rank = cfg.batch_size // world, cfg.minibatch_size // world
    micro = min(cfg.micro_batch_size, mb_rank)
    ph = {}
    t = t_start = clock(device)
    cpu_start = time.process_time()  # CPU seconds of all this process's threads: less sensitive to other tenants
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + fu.rank())
    batch = dvpo.rollout(policy, prompts, tok, cfg.response_len, ALGO.temperature, ALGO.top_p, gen, device,
                         min_new_tokens=cfg.response_len)  # fixed length: both methods do the same work
    T = batch["response"].shape[1]
    mask = data.response_mask(batch["response_len"], T)  # (B, T), all ones
    t = lap(ph, "generation", t, device)

    old_logp = dvpo.frozen_logprobs(policy, batch, T, ALGO.temperature)
    ref_logp = dvpo.frozen_logprobs(models["ref"], batch, T, ALGO.temperature)
    if ppo:  # PPO only: reward model score and the critic's old values
        with torch.inference_mode():
            score = ppo_baseline.scores(models["rm"], {k: batch[k] for k in BATCH_KEYS}, device).clone()  # (B,)
            fu.reshard(models["rm"])
        with torch.no_grad():  # the critic is trained: no_grad, not inference_mode (see dvpo.frozen_logprobs)
            old_values = ppo_baseline.critic_values(models["critic"], batch, T) * mask  # (B, T)
            fu.reshard(models["critic"])
    else:
        w = dvpo.gvm_values(models["gvm"], batch, [[] for _ in prompts], tok.pad_token_id, device)  # (B, T+1)
    t = lap(ph, "frozen", t, device)

    r_kl = -ALGO.kl_beta * (old_logp - ref_logp) * mask
    if ppo:
        adv_raw = ppo_baseline.ppo_advantages(old_values, score, r_kl, mask, ALGO.gamma, ALGO.lam)
        returns = (adv_raw + old_values) * mask
    else:
        adv_raw = dvpo.td_advantages(w, r_kl, mask, ALGO.gamma, ALGO.lam)
    adv = dvpo.masked_batch_norm(adv_raw, mask)
    t = lap(ph, "advantages", t, device)

    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(per_rank, generator=torch.Generator().manual_seed(step * 31 + epoch))
        for mb in range(0, per_rank, mb_rank):
            mb_idx = perm[mb:mb + mb_rank]
            n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone()).item()  # global minibatch tokens
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            for mi in range(0, mb_rank, micro):
                i = mb_idx[mi:mi + micro].to(device)
                sub = {k: batch[k][i] for k in BATCH_KEYS}
                logp, _ = data.response_logprobs(policy, sub, T, ALGO.temperature)
                loss, _ = dvpo.ppo_clip_loss(logp, old_logp[i], adv[i], mask[i], ALGO.clip_eps, n_tokens)
                (loss * world).backward()  # FSDP averages gradients over ranks: undo it
                t = lap(ph, "policy_fwd_bwd", t, device)
                if ppo:  # PPO only: clipped value loss on the critic
                    values = ppo_baseline.critic_values(models["critic"], sub, T)
                    vloss = ppo_baseline.value_loss_clipped(values, old_values[i], returns[i], mask[i],
                                                            PPO_ALGO.value_clip, n_tokens)
                    (vloss * world).backward()
                    t = lap(ph, "critic_fwd_bwd", t, device)
            for name, o in opts.items():
                fu.grad_norm_clip(models[name], ALGO.grad_clip)
                o.step()
            t = lap(ph, "optimizer", t, device)
    ph["total"], ph["cpu_total"] = t - t_start, time.process_time() - cpu_start
    return ph


# ----------------------------------------------------------------------------------------------
# measure: one method in this process (or these torchrun ranks)

def measure(cfg: Config) -> dict:
    """One method: baseline RSS, models, warmup + timed steps, peak memory (max over ranks); the
    result is written to cfg.result by rank 0."""
    device = fu.setup(cfg.device)
    torch.set_num_threads(cfg.threads)
    fu.seed_everything(cfg.seed, per_rank=False)  # same initial weights on every rank
    world = fu.world()
    if cfg.method not in ("dvpo", "ppo"):
        sys.exit(f"bench.py: --method must be both, dvpo or ppo, got {cfg.method!r}")
    if not cfg.policy and cfg.preset not in PRESETS:
        sys.exit(f"bench.py: --preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    if cfg.steps < 1 or cfg.batch_size % cfg.minibatch_size or cfg.minibatch_size % world or \
            (cfg.minibatch_size // world) % min(cfg.micro_batch_size, cfg.minibatch_size // world):
        sys.exit("bench.py: need steps >= 1; batch_size a multiple of minibatch_size, minibatch_size of the "
                 "process count, and minibatch_size/processes of micro_batch_size")
    if not cfg.policy and cfg.prompt_len + cfg.response_len > 512:
        sys.exit("bench.py: presets have max_position_embeddings 512: prompt_len + response_len must fit")
    tok = AutoTokenizer.from_pretrained(cfg.policy) if cfg.policy else data.build_char_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # import the model's code now (~120 MB of Python modules for Llama): that is not model memory
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(cfg.policy)) if cfg.policy else LlamaConfig]
    rss0 = rss_bytes()  # after imports, process group and tokenizer; before any model exists

    models, counts = build_models(cfg, tok, cfg.method, device)
    opts = {name: torch.optim.AdamW(models[name].parameters(), lr=cfg.lr, weight_decay=0.0)
            for name in ("policy", "critic") if name in models}
    models_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes() - rss0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the steps' peak, not the build's unsharded copies
    prompts = make_prompts(tok, cfg.batch_size // world, cfg.prompt_len, cfg.seed + 1 + fu.rank())

    steps, load = [], [os.getloadavg()]
    for step in range(cfg.warmup + cfg.steps):
        ph = rl_step(models, opts, prompts, tok, cfg, device, step)
        if step >= cfg.warmup:
            steps.append(ph)
        fu.print0(f"{cfg.method} step {step + 1}/{cfg.warmup + cfg.steps}{' (warmup)' if step < cfg.warmup else ''}: "
                  f"{ph['total']:.2f} s | " + " | ".join(f"{k} {ph[k]:.2f}" for k in PHASES if k in ph))
    load.append(os.getloadavg())

    if device.type == "cuda":
        mem = [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device), 0]
        net = mem[0]
    else:
        mem = [peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss0]
        net = mem[0] - rss0
    m = torch.tensor([net, *mem, models_bytes], dtype=torch.float64, device=device)
    if fu.is_dist():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)  # the busiest rank's peak: memory per device
    net, peak, peak2, base, models_bytes = (int(x) for x in m.tolist())
    result = {"method": cfg.method, "device": str(device), "world": world, "threads": cfg.threads,
              "params": {"policy": counts["policy"], "value": counts["value"]},
              "peak_memory_bytes": net, "models_bytes": models_bytes,
              "memory": ({"max_allocated": peak, "max_reserved": peak2} if device.type == "cuda" else
                         {"peak_rss": peak, "ru_maxrss": peak2, "baseline_rss": base}),
              "step_times_s": [s["total"] for s in steps], "step_cpu_s": [s["cpu_total"] for s in steps],
              "phases": steps, "loadavg": load}
    fu.print0(f"{cfg.method}: peak memory {net / 2**30:.3f} GiB{' net' if device.type == 'cpu' else ''} | "
              f"step {statistics.median(result['step_times_s']):.2f} s (median of {cfg.steps})")
    if cfg.result:
        fu.write_json(cfg.result, result)
    fu.cleanup()
    return result


# ----------------------------------------------------------------------------------------------
# main: fresh processes per method and repeat, then medians, ratios, the analytic model, a table

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(cfg: Config, mmap_malloc: bool = False) -> dict:
    """The measurement processes' environment: no torchrun variables of ours, pinned threads, and
    for memory runs (mmap_malloc) a glibc malloc whose RSS follows the live tensors."""
    torchrun_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in torchrun_vars and not k.startswith("TORCHELASTIC")}
    env["OMP_NUM_THREADS"] = str(cfg.threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning: on a busy
    # 2-core machine, spinning made 2 threads 25× slower than 1 (50m, 32-token generation: 42 s vs 1.7 s)
    if mmap_malloc:  # glibc: blocks ≥ 64 KiB mmapped and returned when freed. By default freed heap blocks stay
        # resident (50m: +0.35 GiB DVPO, +0.45 GiB PPO, varying by run); but the page faults cost time (50m DVPO
        # step 10.9 s instead of 7.4 s), so timed runs keep the default
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return env


def launch(cfg: Config, method: str, nproc: int, result: str, mmap_malloc: bool = False) -> dict:
    """Run `bench.py --method <method>` in a fresh process (torchrun when nproc > 1); its result."""
    args = [f"--{k}={v}" for k, v in asdict(cfg).items() if k not in ("method", "result", "processes")]
    args += [f"--method={method}", f"--result={result}"]
    cmd = [sys.executable, os.path.abspath(__file__)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.abspath(__file__)]
    p = subprocess.run(cmd + args, env=child_env(cfg, mmap_malloc))
    if p.returncode:
        sys.exit(f"bench.py: the {method} measurement failed (exit {p.returncode}): {' '.join(cmd + args)}")
    with open(result) as f:
        return json.load(f)


def summarize(runs: list[dict], mem: list[dict]) -> dict:
    """One method: memory from its memory runs `mem` (CPU; on CUDA mem = runs), medians over the
    timed repeats `runs` of each repeat's median step time and mean phase times; the mean over every
    timed step; every run's raw result."""
    med, cuda = statistics.median, "max_allocated" in runs[0]["memory"]
    return {"peak_memory_bytes": med(r["peak_memory_bytes"] for r in mem),  # net on CPU, max allocated on CUDA
            "peak_memory_raw_bytes": med(r["memory"]["max_reserved" if cuda else "peak_rss"] for r in mem),
            **({} if cuda else {"ru_maxrss_bytes": med(r["memory"]["ru_maxrss"] for r in mem),
                                "peak_memory_default_malloc_bytes": med(r["peak_memory_bytes"] for r in runs)}),
            "models_bytes": med(r["models_bytes"] for r in mem),
            "step_time_s": med(med(r["step_times_s"]) for r in runs),
            "step_time_mean_s": statistics.mean(t for r in runs for t in r["step_times_s"]),
            "step_cpu_s": med(med(r["step_cpu_s"]) for r in runs),
            "phases": {k: med(statistics.mean(s.get(k, 0.0) for s in r["phases"]) for r in runs) for k in PHASES},
            "loadavg": [r["loadavg"] for r in runs], "repeats": runs, "memory_runs": [] if mem is runs else mem}


def table(res: dict) -> str:
    """Markdown table: DVPO, PPO, measured DVPO/PPO, analytic DVPO/PPO."""
    d, p, a = res["dvpo"], res["ppo"], res["analytic"]
    GB, excl = 2**30, lambda x: x["step_time_s"] - x["phases"]["generation"]
    cuda = "ru_maxrss_bytes" not in d
    rows = [("peak memory, max allocated (GiB)" if cuda else "peak memory, net: peak RSS − baseline (GiB)",
             d["peak_memory_bytes"] / GB, p["peak_memory_bytes"] / GB, a["memory_ratio"]),
            ("peak memory, max reserved (GiB)" if cuda else "peak memory, raw: peak RSS (GiB)",
             d["peak_memory_raw_bytes"] / GB, p["peak_memory_raw_bytes"] / GB, None),
            *([] if cuda else [("peak memory, net, glibc default malloc (GiB)", d["peak_memory_default_malloc_bytes"] / GB,
                                 p["peak_memory_default_malloc_bytes"] / GB, None)]),
            ("models built (GiB)" if cuda else "models built, net (GiB)", d["models_bytes"] / GB, p["models_bytes"] / GB, None),
            ("analytic model state (GiB)", a["memory_bytes"]["dvpo"] / GB, a["memory_bytes"]["ppo"] / GB, a["memory_ratio"]),
            ("step time, median (s)", d["step_time_s"], p["step_time_s"], a["time_ratio"]),
            ("step time, mean (s)", d["step_time_mean_s"], p["step_time_mean_s"], None),
            ("step CPU time, median (s)", d["step_cpu_s"], p["step_cpu_s"], a["time_ratio"])]
    rows += [(f"· {k} (s)", d["phases"][k], p["phases"][k], a["phase_ratio"].get(k)) for k in PHASES]
    rows.append(("step time − generation (s)", excl(d), excl(p), a["time_ratio_excl_generation"]))
    out = ["| | DVPO | PPO | DVPO/PPO | analytic |", "|---|---|---|---|---|"]
    for name, dv, pp, an in rows:
        out.append(f"| {name} | {dv:.2f} | {pp:.2f} | {f'{dv / pp:.3f}' if pp else '–'} | {'' if an is None else f'{an:.3f}'} |")
    load = lambda x: " / ".join(f"{r[0][0]:.1f}–{r[1][0]:.1f}" for r in x["loadavg"])
    out.append(f"| loadavg 1 min, per repeat | {load(d)} | {load(p)} | | |")
    return "\n".join(out)


def main(cfg: Config) -> dict:
    if int(os.environ.get("RANK", 0)) > 0:
        return {}  # launched by torchrun: rank 0 relaunches torchrun for each measurement
    nproc = int(os.environ.get("WORLD_SIZE", cfg.processes))
    if cfg.repeats < 1:
        sys.exit("bench.py: --repeats must be >= 1")
    os.makedirs(cfg.out_dir, exist_ok=True)
    runs = {"dvpo": [], "ppo": []}
    for r in range(cfg.repeats):
        for method in (("dvpo", "ppo") if r % 2 == 0 else ("ppo", "dvpo")):  # alternate who goes first
            res = launch(cfg, method, nproc, os.path.join(cfg.out_dir, f"r{r}_{method}.json"))
            runs[method].append(res)
            print(f"repeat {r + 1}/{cfg.repeats} {method}: peak {res['peak_memory_bytes'] / 2**30:.3f} GiB | "
                  f"step {statistics.median(res['step_times_s']):.2f} s (median of {len(res['step_times_s'])}) | "
                  f"loadavg {res['loadavg'][0][0]:.2f}-{res['loadavg'][1][0]:.2f}", flush=True)
    mem = runs  # CUDA: max_memory_allocated counts live tensors already
    if runs["dvpo"][0]["device"] == "cpu":  # one more short run per method whose RSS follows live tensors
        mem = {m: [launch(replace(cfg, steps=1), m, nproc, os.path.join(cfg.out_dir, f"memory_{m}.json"), True)]
               for m in ("dvpo", "ppo")}
        print(" | ".join(f"memory run {m}: peak {r[0]['peak_memory_bytes'] / 2**30:.3f} GiB" for m, r in mem.items()))

    first = runs["dvpo"][0]
    n_pi, n_v = first["params"]["policy"], first["params"]["value"]
    tokens = cfg.batch_size * (cfg.prompt_len + cfg.response_len)
    res = {m: summarize(runs[m], mem[m]) for m in ("dvpo", "ppo")}
    res["ratio/memory"] = res["dvpo"]["peak_memory_bytes"] / res["ppo"]["peak_memory_bytes"]
    res["ratio/step_time"] = res["dvpo"]["step_time_s"] / res["ppo"]["step_time_s"]
    res["ratio/step_time_excl_generation"] = ((res["dvpo"]["step_time_s"] - res["dvpo"]["phases"]["generation"]) /
                                              (res["ppo"]["step_time_s"] - res["ppo"]["phases"]["generation"]))
    res["ratio/cpu_time"] = res["dvpo"]["step_cpu_s"] / res["ppo"]["step_cpu_s"]
    res["ratio/step_time_per_repeat"] = [statistics.median(d["step_times_s"]) / statistics.median(p["step_times_s"])
                                         for d, p in zip(runs["dvpo"], runs["ppo"])]
    res["analytic"] = analytic(n_pi, n_v, tokens, cfg.ppo_epochs, nproc)
    res["analytic/memory_ratio"] = res["analytic"]["memory_ratio"]
    res["analytic/time_ratio"] = res["analytic"]["time_ratio"]
    res["analytic/time_ratio_excl_generation"] = res["analytic"]["time_ratio_excl_generation"]
    res.update({"preset": "" if cfg.policy else cfg.preset, "policy": cfg.policy, "params": {"policy": n_pi, "value": n_v},
                "threads": cfg.threads, "nproc": nproc, "device": first["device"], "torch": torch.__version__,
                "transformers": transformers.__version__, "config": asdict(cfg), "paper": PAPER,
                "env": {k: child_env(cfg)[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
                "env_memory_runs": {} if mem is runs else {"MALLOC_MMAP_THRESHOLD_": child_env(cfg, True)["MALLOC_MMAP_THRESHOLD_"]}})
    fu.write_json(os.path.join(cfg.out_dir, "bench.json"), res)

    a, T = res["analytic"], res["analytic"]["bytes_per_param"]
    print(f"\n{cfg.policy or cfg.preset}: policy {n_pi / 1e6:.1f}M params, GVM/RM/critic {n_v / 1e6:.1f}M | "
          f"batch {cfg.batch_size}, prompt {cfg.prompt_len} + response {cfg.response_len} tokens, "
          f"{cfg.ppo_epochs} PPO epochs × {cfg.batch_size // cfg.minibatch_size} minibatches | {first['device']} × {nproc}, "
          f"{cfg.threads} threads | torch {torch.__version__} | medians of {cfg.repeats} repeats × {cfg.steps} steps\n")
    print(table(res))
    print(f"\nanalytic memory: T = {T['trained']:g} B/param trained (w + grad + AdamW m, v), F = {T['frozen']:g} frozen: "
          f"DVPO T·Nπ + F·(Nπ+Nv), PPO T·(Nπ+Nv) + F·(Nπ+Nv) -> {a['memory_ratio']:.3f}")
    print(f"analytic time (2ND forward, 6ND fwd+bwd; units of one forward, E = {cfg.ppo_epochs}): "
          f"DVPO 1 gen + 3 frozen + 3E, PPO 1 + 4 + 6E -> {a['time_ratio']:.3f}; without generation "
          f"{a['time_ratio_excl_generation']:.3f}")
    print(f"measured DVPO/PPO: memory {res['ratio/memory']:.3f}, step time {res['ratio/step_time']:.3f} (per repeat "
          f"{', '.join(f'{x:.3f}' for x in res['ratio/step_time_per_repeat'])}), without generation "
          f"{res['ratio/step_time_excl_generation']:.3f}, CPU time {res['ratio/cpu_time']:.3f} -> "
          f"{os.path.join(cfg.out_dir, 'bench.json')}")
    return res


if __name__ == "__main__":
    cfg = fu.parse_config(Config)
    main(cfg) if cfg.method == "both" else measure(cfg)
