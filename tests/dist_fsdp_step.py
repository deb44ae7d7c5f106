"""One SFT step of the tiny model, the same lines in one process and under FSDP2 (test_fsdp.py
compares the two). Each rank takes its strided half of a fixed batch; the loss is the global token
mean (sft.sft_loss with the all-reduced token count, as in sft.py).

  python tests/dist_fsdp_step.py OUT
  torchrun --nproc_per_node 2 tests/dist_fsdp_step.py OUT
  torchrun --nproc_per_node 2 tests/dist_fsdp_step.py --reuse     # load one full state dict twice
  torchrun --nproc_per_node 2 tests/dist_fsdp_step.py --bn        # masked BN, one row per rank
  [torchrun --nproc_per_node 2] tests/dist_fsdp_step.py --load OUT MODEL VALUE_MODEL   # sharded loading

Writes OUT/model (checkpoint.save_hf), OUT/grads.safetensors and OUT/result.json (rank 0).
Checks that only make sense inside the run (reload, load_full_state_dict, gathered) are asserted
here: a failure exits non-zero.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import fsdp_utils as fu  # noqa: E402
import model as mdl  # noqa: E402
import sft  # noqa: E402
import task  # noqa: E402

torch.set_num_threads(1)
LR, N_ROWS = 1e-4, 8
GEN_JOBS = [(0, 5), (1, 9)]  # (prompt shard, max_new_tokens): ranks run different numbers of forwards


def is_dtensor(p) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor)


def main(out: str):
    device = fu.setup("cpu")
    tok = task.build_char_tokenizer()
    model = task.build_tiny_model(tok, seed=0)
    rows = task.builtin_sft_data(N_ROWS, seed=0)
    enc = [(data.encode_prompt(tok, r["prompt"]), data.encode_response(tok, r["response"])) for r in rows]
    mine = enc[fu.rank()::fu.world()]

    model = fu.shard(model, device)
    assert all(is_dtensor(p) for p in model.parameters()) == fu.is_dist()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    batch = data.collate_right([p for p, _ in mine], [r for _, r in mine], tok.pad_token_id)
    T = int(batch["response_len"].max())
    mask = data.response_mask(batch["response_len"], T)
    n_tokens = fu.all_reduce_sum(mask.sum().detach().clone()).item()  # global response-token count
    logp, _ = mdl.response_logprobs(model, batch, T)
    loss = sft.sft_loss(logp, mask, n_tokens)
    (loss * fu.world()).backward()  # DDP/FSDP average gradients over ranks: undo it
    # full gradients before clipping (AdamW's first step is ~lr * sign(g), so the weights alone
    # would hide a wrongly scaled gradient); full_tensor() is a collective
    grads = {n: (p.grad.full_tensor() if is_dtensor(p.grad) else p.grad).detach().clone()
             for n, p in model.named_parameters()}
    gnorm = float(fu.grad_norm_clip(model, 1.0))
    opt.step()
    m = fu.reduce_metrics({"loss": loss.item(), "rank": fu.rank()}, device)
    result = {"world": fu.world(), "n_tokens": n_tokens, "loss": m["loss"] * fu.world(), "rank_mean": m["rank"],
              "grad_norm": gnorm}

    # rollout inside gathered(): eval mode, parameters kept gathered between generated tokens
    prompts = task.builtin_prompts(6, "eval")
    gen = {}
    with fu.gathered(model):
        assert not model.training
        for shard_id, max_new in GEN_JOBS:
            if fu.is_dist() and shard_id != fu.rank():
                continue
            left = data.collate_left([data.encode_prompt(tok, p) for p in prompts[shard_id::2]], tok.pad_token_id)
            ids, length, _ = mdl.generate(model, left["input_ids"], left["attention_mask"], max_new,
                                           tok.eos_token_id, tok.pad_token_id, temperature=0.0)
            gen[shard_id] = [row[:n].tolist() for row, n in zip(ids, length)]
        if fu.is_dist():
            assert not any(is_dtensor(p) for p in model.parameters())  # still gathered after the forwards
    assert model.training
    assert all(is_dtensor(p) for p in model.parameters()) == fu.is_dist()  # resharded on exit
    if fu.is_dist():
        parts = [None] * fu.world()
        dist.all_gather_object(parts, gen)
        gen = {k: v for part in parts for k, v in part.items()}
    result["generated"] = {str(k): v for k, v in sorted(gen.items())}

    # save, reload with transformers on rank 0
    sd = fu.full_state_dict(model)  # collective: every rank calls it; {} off rank 0
    assert (len(sd) > 0) == (fu.rank() == 0)
    checkpoint.save_hf(model, tok, os.path.join(out, "model"))
    if fu.rank() == 0:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
        rsd = reloaded.state_dict()
        assert set(rsd) == set(sd), set(rsd) ^ set(sd)
        assert all(torch.equal(rsd[k], sd[k]) for k in sd)
        assert AutoTokenizer.from_pretrained(os.path.join(out, "model")).eos_token_id == tok.eos_token_id

    # load_full_state_dict: rank 0's weights into a differently initialised, sharded model
    fresh = fu.shard(task.build_tiny_model(tok, seed=1), device)
    fu.load_full_state_dict(fresh, dict(sd))  # a copy: see reuse_state_dict()
    fsd = fu.full_state_dict(fresh)
    if fu.rank() == 0:
        assert all(torch.equal(fsd[k], sd[k]) for k in sd)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)
    fu.reshard(model)
    fu.reshard(fresh)

    if fu.rank() == 0:
        from safetensors.torch import save_file
        save_file(grads, os.path.join(out, "grads.safetensors"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f, indent=2)
    fu.cleanup()


def reuse_state_dict():
    """One full state dict loaded into two sharded models (policy and reference from the same SFT
    checkpoint): the caller's dict must still hold the full tensors after the first load."""
    device = fu.setup("cpu")
    tok = task.build_char_tokenizer()
    sd = fu.full_state_dict(fu.shard(task.build_tiny_model(tok, seed=0), device))
    ref = {k: v.clone() for k, v in sd.items()}
    for seed in (1, 2):
        model = fu.shard(task.build_tiny_model(tok, seed=seed), device)
        fu.load_full_state_dict(model, sd)
        if fu.rank() == 0:
            changed = [k for k in ref if type(sd[k]) is not torch.Tensor or not torch.equal(sd[k], ref[k])]
            assert not changed, f"load_full_state_dict modified the caller's state dict: {changed[:3]} ..."
        got = fu.full_state_dict(model)
        if fu.rank() == 0:
            assert all(torch.equal(got[k], ref[k]) for k in ref)
    fu.cleanup()


def batch_norm_one_row_per_rank():
    """docs/algorithm.md §10: the masked-BN vector split one row per rank gives the same output as
    the whole batch in one process (the statistics are all-reduced in fp64)."""
    import dvpo
    fu.setup("cpu")
    Q = torch.tensor([[0.2, 0.4, 0.6, 7.0], [-0.3, 0.1, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    expected = torch.tensor([[0, 0.65938, 1.318761, 0], [-1.648451, -0.32969, 0, 0]])
    r = fu.rank()
    out = dvpo.masked_batch_norm(Q[r:r + 1], mask[r:r + 1])
    assert torch.allclose(out, expected[r:r + 1], atol=1e-5), (r, out)
    fu.cleanup()


def sharded_loading(out: str, path: str, value_path: str):
    """Every loader of model.py on 1 or 2 processes: the gathered weights equal the files bit for
    bit (tied embeddings still tied, rotary buffers recomputed), only rank 0 ever builds a loaded
    model, and one optimizer step's loss and gradients (two micro-batches, gradient sync off on the
    first) go to OUT for test_fsdp.py to compare across process counts."""
    from transformers import AutoModel, AutoModelForCausalLM

    device = fu.setup("cpu")
    builds = []
    policy = fu.on_device(lambda meta: builds.append(meta) or mdl.hf_model(path, torch.float32, meta), device)
    assert builds == ([False, True] if fu.rank() == 0 and fu.is_dist() else [True] if fu.is_dist() else [False])
    ref, _ = mdl.load_policy(path, device, dtype=torch.bfloat16, frozen=True)
    value, _, _ = mdl.load_value_model(value_path, "value_config.json", "", device)
    fresh = mdl.new_value_model(path, device)
    hf = AutoModelForCausalLM.from_pretrained(path)  # the references: every rank may hold them in a test
    hf_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    hf_value = mdl.ValueModel(AutoModel.from_pretrained(value_path))
    hf_value.value_head.load_state_dict(load_file(os.path.join(value_path, "value_head.safetensors")))
    hf_fresh = mdl.ValueModel(AutoModel.from_pretrained(path))
    for name, model, expect in (("policy", policy, hf), ("ref", ref, hf_bf16), ("value", value, hf_value),
                                ("fresh", fresh, hf_fresh)):
        got, want = fu.full_state_dict(model), expect.state_dict()  # a collective; rank 0 compares
        if fu.rank() == 0:
            assert set(got) == set(want), (name, set(got) ^ set(want))
            bad = [k for k in got if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
            assert not bad, (name, bad[:3])
        want = dict(expect.named_buffers())  # rotary inv_freq: not in the state dict, garbage after to_empty
        assert all(torch.equal(b, want[k]) and b.dtype == want[k].dtype for k, b in model.named_buffers()), name
    assert hf_fresh.value_head.weight.abs().sum() == 0 and hf_value.value_head.weight.abs().sum() > 0
    tied = hf.config.tie_word_embeddings
    assert (policy.lm_head.weight is policy.model.embed_tokens.weight) == tied
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training

    # one step: each rank its strided half of a fixed batch, two micro-batches, global token mean
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, hf.config.vocab_size, (8, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": torch.full((8,), 4),
             "response_len": torch.randint(1, 9, (8,), generator=g)}
    mine = {k: v[fu.rank()::fu.world()] for k, v in batch.items()}
    mask = data.response_mask(mine["response_len"], 8)
    target = torch.randn(8, 12, generator=g)[fu.rank()::fu.world()]
    n_tokens = fu.all_reduce_sum(mask.sum()).item()
    result = {"world": fu.world(), "tied": tied}
    grads = {}
    for name, model in (("policy", policy), ("value", value)):
        loss_sum = 0.0
        half = len(mask) // 2
        for i, part in enumerate((slice(0, half), slice(half, None))):  # two micro-batches: sync after the second
            fu.grad_sync(model, i == 1)
            sub = {k: v[part] for k, v in mine.items()}
            if name == "policy":
                logp, _ = mdl.response_logprobs(model, sub, 8)
                loss = -(logp * mask[part]).sum() * fu.world() / n_tokens
            else:
                u = model(sub["input_ids"], sub["attention_mask"])
                loss = ((u - target[part]) ** 2).sum() * fu.world() / ids.numel()
            loss.backward()
            loss_sum += loss.item()
        result[name + "_loss"] = fu.reduce_metrics({"l": loss_sum / fu.world()}, device)["l"] * fu.world()
        grads.update({f"{name}.{n}": (p.grad.full_tensor() if is_dtensor(p.grad) else p.grad).detach().clone()
                      for n, p in model.named_parameters()})
    if fu.rank() == 0:
        from safetensors.torch import save_file
        os.makedirs(out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in grads.items()}, os.path.join(out, "grads.safetensors"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f, indent=2)
    fu.cleanup()


if __name__ == "__main__":
    if sys.argv[1] == "--load":
        sharded_loading(*sys.argv[2:5])
    else:
        {"--reuse": reuse_state_dict, "--bn": batch_norm_one_row_per_rank}.get(sys.argv[1], lambda: main(sys.argv[1]))()
