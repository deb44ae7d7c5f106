"""Load a training checkpoint under any process count and save it again, as dvpo.py would: the policy
and its AdamW built from MODEL (sharded under torchrun), checkpoint.load_checkpoint(SRC), then
checkpoint.save_checkpoint(DST). test_checkpoint.py compares SRC and DST tensor by tensor: loading a
checkpoint saved by another process count (DCP reshards) must change no bit of any weight or optimizer
state. Without SRC ('') nothing is loaded: the optimizer state is allocated (zeros) before the save.

  python tests/dist_checkpoint.py MODEL SRC DST
  torchrun --nproc_per_node 2 tests/dist_checkpoint.py MODEL SRC DST

Rank 0 prints one JSON line per rank: how far its peak RSS rose above its RSS before load_checkpoint and
before save_checkpoint (Linux: VmHWM, reset through /proc/self/clear_refs), beside the size of its own
shards (model + optimizer) and of the full model: a rank that gathered the full model during a save
would rise by at least the full model.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed.checkpoint.state_dict  # noqa: E402

import checkpoint  # noqa: E402
import fsdp_utils as fu  # noqa: E402
import model as mdl  # noqa: E402

torch.set_num_threads(1)
MIB = 2 ** 20


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in KiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rise_mib(fn) -> float:
    """Run fn(); how far the peak RSS rose above the RSS before it, in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - before) / 1024


def local_mib(tensors) -> float:
    """MiB of this rank's part of some tensors (a DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors) / MIB


def main(model_path: str, src: str, dst: str):
    device = fu.setup("cpu")
    policy, tok = mdl.load_policy(model_path, device)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    state, trained = {"step": 0}, {"policy": (policy, opt)}
    if src:
        load = peak_rise_mib(lambda: checkpoint.load_checkpoint(src, state, trained))
    else:  # the optimizer state a training step would have allocated, so the save's figure is the save's alone
        load = 0.0
        torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(policy, opt)
    save = peak_rise_mib(lambda: checkpoint.save_checkpoint(dst, tok, state, trained))  # a collective
    opt_tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    full = sum(p.numel() * p.element_size() for p in policy.parameters()) / MIB  # DTensor: the global size
    mine = {"rank": fu.rank(), "world": fu.world(), "load_rise_mib": round(load, 1), "save_rise_mib": round(save, 1),
            "shards_mib": round(local_mib(policy.parameters()) + local_mib(opt_tensors), 1),
            "full_model_mib": round(full, 1)}
    for line in fu.all_gather_object(mine):  # a collective: every rank calls it; rank 0 prints every rank's line
        fu.print0(json.dumps(line))
    fu.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:4])
