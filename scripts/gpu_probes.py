"""scripts/gpu_probes.py — the two measurements of scripts/gpu_check.sh that are not runs of the scripts.

  sdpa        The cuDNN SDPA hazard (PyTorch issue 196678): forward + backward of scaled_dot_product_attention
              on a left-padded batch (its pad rows are fully-masked queries) at several lengths, with the
              cuDNN backend forced on, and with this repo's setting (fsdp_utils.setup turns cuDNN SDPA off):
              non-finite gradients counted; then one forward + backward of a policy on a left-padded rollout
              batch, as dvpo.py runs it.
  generation  Decoding throughput of a policy (bench.py's presets, random weights): model.generate as dvpo.py
              runs it (parameters gathered once, a CPU-GPU sync per token to stop early), the same loop
              without the per-token sync, and the policy without FSDP2 (no hooks on every decode step).
Each prints one JSON line. `python scripts/gpu_probes.py sdpa`, `python scripts/gpu_probes.py generation --preset 1b`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402  (the repo root, not installed)
import data  # noqa: E402
import fsdp_utils as fu  # noqa: E402
import model  # noqa: E402
import task  # noqa: E402


def left_padded_mask(B: int, L: int, device) -> torch.Tensor:
    """(B, 1, L, L) boolean SDPA mask: causal, with row b's first b·L/(2B) positions padding (no key
    visible to a padding query: a fully-masked row, as the rollout layout has)."""
    pad = torch.arange(B, device=device) * L // (2 * B)
    keep = torch.arange(L, device=device)[None, :] >= pad[:, None]  # (B, L) real tokens
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    return (causal[None] & keep[:, None, :] & keep[:, :, None])[:, None]


def sdpa_case(L: int, backend, device) -> int:
    """Non-finite entries of dq, dk, dv for one left-padded SDPA forward + backward (bf16, 8 heads of 64)."""
    from torch.nn.attention import sdpa_kernel  # optional: the probe only
    g = torch.Generator(device=device).manual_seed(L)
    q, k, v = (torch.randn(4, 8, L, 64, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    with sdpa_kernel(backend) if backend is not None else torch.enable_grad():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=left_padded_mask(4, L, device))
        out.float().square().sum().backward()
    return int(sum((~torch.isfinite(t.grad)).sum() for t in (q, k, v)))


def probe_sdpa(device, lengths=(128, 256, 512, 1000, 1024, 2048)) -> dict:
    from torch.nn.attention import SDPBackend  # optional: the probe only
    res = {"device": str(device), "cases": []}
    for L in lengths:
        row = {"L": L, "repo_setting_nonfinite": sdpa_case(L, None, device)}
        if device.type == "cuda":
            try:
                row["cudnn_forced_nonfinite"] = sdpa_case(L, [SDPBackend.CUDNN_ATTENTION], device)
            except RuntimeError as e:  # cuDNN SDPA unavailable for this shape or build
                row["cudnn_forced_nonfinite"] = f"unavailable: {str(e).splitlines()[0][:80]}"
        res["cases"].append(row)
    # a policy forward + backward on a left-padded rollout batch (the layout dvpo.py trains on)
    tok = task.build_char_tokenizer()
    policy = task.build_tiny_model(tok, seed=0).to(device)
    prompts = [[5] * n for n in (3, 9, 17, 30)]
    left = {k: v.to(device) for k, v in data.collate_left(prompts, tok.pad_token_id).items()}
    T = 16
    resp = torch.randint(3, 90, (4, T), device=device)
    batch = {"input_ids": torch.cat([left["input_ids"], resp], 1),
             "attention_mask": torch.cat([left["attention_mask"], torch.ones_like(resp)], 1),
             "prompt_len": torch.full((4,), left["input_ids"].shape[1], device=device),
             "response_len": torch.full((4,), T, device=device)}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logp, _ = model.response_logprobs(policy, batch, T)
    logp.sum().backward()
    res["policy_grad_nonfinite"] = int(sum((~torch.isfinite(p.grad)).sum() for p in policy.parameters()))
    return res


def decode_tokens_per_s(policy, prompts, n_new: int, device, sync_every_token: bool) -> float:
    """model.generate's loop at a fixed length (no early stop), with or without the per-token sync."""
    ids = torch.tensor(prompts, device=device)
    am = torch.ones_like(ids)
    t0 = bench.clock(device)
    with torch.no_grad():
        if sync_every_token:  # exactly what dvpo.py runs (EOS masked to force the length)
            model.generate(policy, ids, am, n_new, [1], 0, 1.0, 1.0, None, min_new_tokens=n_new)
        else:  # the same steps, no host sync until the end
            pos = model.position_ids(am)
            out = policy(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, logits_to_keep=1)
            cache, tok, p = out.cache, None, pos[:, -1]
            for _ in range(n_new):
                tok = model.sample_token(out.logits[:, -1], 1.0, 1.0)
                p = p + 1
                am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
                out = policy(input_ids=tok[:, None], attention_mask=am, position_ids=p[:, None], cache=cache,
                             use_cache=True)
                cache = out.cache
    return len(prompts) * n_new / (bench.clock(device) - t0)


def probe_generation(device, preset: str, batch: int, prompt_len: int, n_new: int) -> dict:
    cfg = bench.Config(preset=preset, out_dir=os.path.join(ROOT, "out", "bench"))
    path = bench.write_preset(cfg)
    tok = model.load_tokenizer(path)
    prompts = bench.tok_prompts(tok, batch, prompt_len, 0)
    res = {"device": str(device), "preset": preset, "batch": batch, "prompt_len": prompt_len, "new_tokens": n_new}
    sharded, _ = model.load_policy(path, device)  # as dvpo.py: FSDP2 (a 1-rank group on CUDA), fp32 master weights
    with fu.gathered(sharded):
        decode_tokens_per_s(sharded, prompts, 4, device, True)  # warm-up
        res["fsdp2_sync_per_token"] = decode_tokens_per_s(sharded, prompts, n_new, device, True)
        res["fsdp2_no_sync"] = decode_tokens_per_s(sharded, prompts, n_new, device, False)
    del sharded
    plain = model.hf_model(path, torch.bfloat16 if device.type == "cuda" else torch.float32, False).to(device).eval()
    decode_tokens_per_s(plain, prompts, 4, device, True)
    res["plain_sync_per_token"] = decode_tokens_per_s(plain, prompts, n_new, device, True)
    res["plain_no_sync"] = decode_tokens_per_s(plain, prompts, n_new, device, False)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probe", choices=["sdpa", "generation"])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--lengths", default="128,256,512,1000,1024,2048", help="sdpa: sequence lengths")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    device = fu.setup(a.device)
    if a.probe == "sdpa":
        res = probe_sdpa(device, [int(L) for L in a.lengths.split(",")])
    else:
        res = probe_generation(device, a.preset, a.batch, a.prompt_len, a.new_tokens)
    print(json.dumps(res), flush=True)
    fu.cleanup()


if __name__ == "__main__":
    main()
