"""fsdp_utils.py — distributed plumbing only: no algorithm code lives here.

One code path for one process and for `torchrun`: every helper is a no-op (or the obvious local
operation) when the process group is not initialized, so `python x.py` and
`torchrun --nproc_per_node 8 x.py` run the same lines.
  1. setup(): pick this rank's device and start the process group: from the torchrun environment (nccl on
     CUDA, gloo on CPU), and on CUDA always, a 1-rank group for `python x.py` — so one GPU runs the same
     FSDP2 bf16 path as eight. (On CPU `python x.py` needs none: everything is fp32 there.) TF32 on, the
     cuDNN SDPA backend off (its backward returns NaN for the fully-masked query rows of left padding).
  2. shard(model): FSDP2 `fully_shard` on each decoder block, then on the root; bf16 params with
     fp32 gradient reduction on CUDA; value heads are their own fp32 unit. Frozen models are sharded
     the same way (never replicated).
     Sharded loading (on_device, torchtitan's pattern): a model built on the meta device is sharded
     first, then only this rank's shards are allocated and filled from rank 0's full copy, tensor by
     tensor.
  3. full_state_dict / load_full_state_dict: a full state dict on rank 0 (a collective: every rank
     calls it), and back into the shards; checkpoint.py writes it to disk.
  4. all_reduce_sum / reduce_metrics / broadcast_object / all_gather_object / print0.
  5. gathered(model): keep parameters gathered for a whole rollout (FSDP2 otherwise re-gathers every
     block for every generated token), in eval() mode so the KV cache is used.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def setup(device: str = "auto", timeout_min: float = 60) -> torch.device:
    """This rank's device, and the process group: from the torchrun environment (WORLD_SIZE > 1), and on
    CUDA always (a 1-rank group without torchrun), so that 1 GPU and N GPUs run the same FSDP2 lines.
    device: auto = cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" = this rank's GPU, cuda:LOCAL_RANK.
    timeout_min: how long a collective may wait (NCCL's default, 10 minutes, is shorter than rank 0 alone
    writing an 8B model's final HF export)."""
    transformers.utils.logging.set_verbosity_error()  # no load reports for the dropped lm_head etc.
    transformers.utils.logging.disable_progress_bar()  # our own tqdm bars are the progress
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (value heads) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)  # PyTorch #196678: NaN backward on fully-masked rows
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not is_dist() and (world_size > 1 or dev.type == "cuda"):
        backend, timeout = ("nccl" if dev.type == "cuda" else "gloo"), timedelta(minutes=timeout_min)
        device_id = dev if dev.type == "cuda" else None
        if "MASTER_ADDR" in os.environ:  # torchrun
            dist.init_process_group(backend, device_id=device_id, timeout=timeout)
        else:  # `python x.py` on one GPU: a 1-rank group in this process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id,
                                    timeout=timeout)
    return dev


def cleanup():
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of any HF decoder, found by the class names it declares as
    `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, GPT2Block, ...)."""
    names = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: torch.nn.Module, device: torch.device, mixed_precision: bool | None = None,
          full: torch.nn.Module | None = None, fp32_modules: tuple = ()) -> torch.nn.Module:
    """With a process group apply FSDP2: fully_shard(block) for each decoder block, each of fp32_modules
    (e.g. a value head) as its own unit that computes in fp32, then fully_shard(root); no process group
    (one CPU process): just move to device. mixed_precision (default: on for CUDA) computes in bf16 and
    reduces gradients in fp32; the sharded weights keep the model's dtype (fp32 master weights).
    Sharded loading: when `model` was built on the meta device (it holds no memory), only this
    rank's shards are allocated (to_empty) and filled from `full`, the loaded model on rank 0's CPU
    (None on the other ranks; see load_from_rank0)."""
    if not is_dist():
        return model.to(device)
    meta = any(p.is_meta for p in model.parameters())
    if not meta:
        model.to(device)
    if mixed_precision is None:
        mixed_precision = device.type == "cuda"
    mesh = init_device_mesh(device.type, (world(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
          else MixedPrecisionPolicy())
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for name in fp32_modules:
        fully_shard(model.get_submodule(name), mesh=mesh,
                    mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if meta:
        model.to_empty(device=device)  # this rank's shards (and the small buffers), uninitialised
        load_from_rank0(model, full)
    return model


@torch.no_grad()
def load_from_rank0(model: torch.nn.Module, full: torch.nn.Module | None):
    """Fill a sharded model from `full` (rank 0: the loaded model on its CPU; other ranks: None).
    set_model_state_dict broadcasts one tensor at a time, and each rank keeps only its slice: no
    rank but 0 ever holds more than its shards plus one full tensor, and no device holds an
    unsharded model. Buffers go separately: non-persistent ones (rotary inv_freq) are not in the
    state dict, and to_empty left them uninitialised."""
    load_full_state_dict(model, full.state_dict() if rank() == 0 else {})
    src = dict(full.named_buffers()) if rank() == 0 else {}
    for name, buf in model.named_buffers():
        if rank() == 0:
            buf.copy_(src[name])
        dist.broadcast(buf, src=0)


def on_device(load, device, frozen: bool = False, fp32_modules: tuple = ()):
    """The one way a script gets a model: `load(meta)` builds it — on the CPU with its weights
    (meta=False), or the same modules on the meta device, no memory (meta=True). One process:
    load(False) moved to `device`. Under torchrun (sharded loading): rank 0 calls load(False), every
    rank shards load(True), and rank 0's weights are broadcast into the shards (shard, load_from_rank0):
    no rank but 0 ever holds the full model. frozen: no gradients, eval mode. fp32_modules: see shard."""
    full = load(False) if rank() == 0 else None
    model = full
    if is_dist():
        with torch.device("meta"):
            model = load(True)
    if frozen:
        model.requires_grad_(False).eval()
    return shard(model, device, full=full, fp32_modules=fp32_modules)


def grad_sync(model: torch.nn.Module, on: bool):
    """FSDP2 gradient accumulation: with on=False the next backward keeps its gradients unsharded
    on this rank (no reduce-scatter), the final micro-batch (on=True) reduce-scatters the sum. Saves
    (micro-batches - 1) reduce-scatters per optimizer step, and costs the trained model's unsharded
    gradients (fp32 under mixed precision) on every rank meanwhile. No-op on one process."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(on)


def fsdp_modules(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: torch.nn.Module):
    """FSDP2 keeps the root's parameters gathered after a forward; free them after forward-only
    use of a frozen model."""
    for m in fsdp_modules(model):
        m.reshard()


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """For a rollout: eval() mode (KV cache on, dropout off) and, under FSDP2, parameters gathered
    once and kept for every generated token; resharded and train mode restored on exit."""
    was_training, mods = model.training, fsdp_modules(model)
    model.eval()
    for m in mods:
        m.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for m in mods:
            m.set_reshard_after_forward(True)
            m.reshard()
        model.train(was_training)


def full_state_dict(model: torch.nn.Module) -> dict:
    """Full, unsharded fp32 CPU state dict on rank 0 ({} on other ranks). A collective under FSDP."""
    if not fsdp_modules(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state_dict: dict):
    """Load a full state dict (held by rank 0) into a possibly sharded model: rank 0 broadcasts."""
    if not fsdp_modules(model):
        model.load_state_dict(state_dict)
        return
    # a shallow copy: PyTorch replaces the dict's tensors with shards in place on rank 0
    set_model_state_dict(model, dict(state_dict),
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM across ranks (identity on one process); returns t."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_metrics(metrics: dict, device) -> dict:
    """Mean of scalar metrics over ranks: one all-reduce for the whole dict, then one CPU-GPU sync
    (.tolist()). Values are python numbers or 0-d tensors (detached: kept on the device until here).
    A NaN (a metric undefined on that rank's batch) is left out of its mean; a metric undefined on
    every rank is dropped. Every rank must pass the same keys."""
    keys = sorted(metrics)
    v = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).to(device).reshape(()) for k in keys])
    ok = ~torch.isnan(v)
    t = torch.cat([torch.where(ok, v, torch.zeros_like(v)), ok.double()])  # sums, then counts
    all_reduce_sum(t)  # all-reduce: every rank, same keys
    sums, counts = t[:len(keys)].tolist(), t[len(keys):].tolist()  # CPU-GPU sync
    return {k: s / c for k, s, c in zip(keys, sums, counts) if c > 0}


def grad_norm_clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over all parameters; returns the total norm before clipping as a 0-d tensor
    (no host sync). Under FSDP2 the norm of sharded gradients is a DTensor: full_tensor() all-reduces
    it, so every rank gets the same norm and clips alike (a collective: every rank calls this)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def broadcast_object(obj):
    """Rank 0's python object on every rank (e.g. data generated once on rank 0)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's python object, in rank order, on every rank ([obj] on one process)."""
    if not is_dist():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out

