"""Real scale on a CPU (issue 18): log-probs from chunked fp32 log-softmax at response positions only equal
the plain full-logits computation, memory is bounded by a micro-batch (a subprocess measurement, not a
timing), dropout is off in every loaded model (step-0 KL and clipfrac are 0 at lr 0 on a model with
dropout), and a value head stays fp32 (rotary buffers too) when the frozen backbone is bf16."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import data
import dvpo
import model as mdl
import task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def big_vocab_model(vocab=2000, seed=0, **kw):
    """A tiny Llama with a real-sized vocabulary relative to its width (V ≫ H, as in 1B-8B models)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None, **kw)
    return LlamaForCausalLM(cfg)


def rollout_batch(vocab, B=6, P=7, T=9, seed=1):
    """The rollout layout: left-padded prompts of width P, right-padded responses of width T."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(2, P + 1, (B,), generator=g)
    r_len = torch.randint(1, T + 1, (B,), generator=g)
    prompts = [torch.randint(2, vocab, (int(n),), generator=g).tolist() for n in p_len]
    responses = [torch.randint(2, vocab, (int(n),), generator=g).tolist() for n in r_len]
    left = data.collate_left(prompts, 0)
    resp = torch.zeros(B, T, dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r)
    return {"input_ids": torch.cat([left["input_ids"], resp], 1),
            "attention_mask": torch.cat([left["attention_mask"], data.response_mask(r_len, T).long()], 1),
            "prompt_len": torch.full((B,), P), "response_len": r_len}


def reference_logprobs(policy, batch, T, temperature):
    """The plain computation: full (B, L, V) logits in fp32, log-softmax, read at P+t-2."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    logits = policy(input_ids=ids, attention_mask=am, position_ids=mdl.position_ids(am)).logits.float()
    lsm = F.log_softmax(mdl.gather_response(logits, batch["prompt_len"] - 1, T) / temperature, -1)
    logp = lsm.gather(-1, mdl.gather_response(ids, batch["prompt_len"], T)[..., None]).squeeze(-1)
    return logp, -(lsm.exp() * lsm).sum(-1)


@pytest.mark.parametrize("chunk", [2**26, 3000])  # one chunk, and one response position per chunk
@pytest.mark.parametrize("layout", ["rollout", "right"])
def test_chunked_logprobs_equal_the_full_computation(monkeypatch, chunk, layout):
    policy = big_vocab_model()
    batch = rollout_batch(2000)
    if layout == "right":  # right-padded rows of different prompt lengths (sft.py's layout)
        n_p = batch["attention_mask"][:, :7].sum(1)
        prompts = [batch["input_ids"][b, 7 - n:7].tolist() for b, n in enumerate(n_p.tolist())]
        responses = [batch["input_ids"][b, 7:7 + n].tolist() for b, n in enumerate(batch["response_len"].tolist())]
        batch = data.collate_right(prompts, responses, 0)
    monkeypatch.setattr(mdl, "LOGITS_CHUNK", chunk)
    mask = data.response_mask(batch["response_len"], 9)
    ref, ref_ent = reference_logprobs(policy, batch, 9, 0.7)
    logp, ent = mdl.response_logprobs(policy, batch, 9, 0.7, with_entropy=True)
    torch.testing.assert_close(logp * mask, ref * mask, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent * mask, ref_ent * mask, rtol=1e-6, atol=1e-6)
    # the gradient through the checkpointed chunks is the plain one
    (logp * mask).sum().backward()
    g = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    (reference_logprobs(policy, batch, 9, 0.7)[0] * mask).sum().backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_value_head_stays_fp32_with_a_bf16_backbone(tmp_path):
    tok = task.build_char_tokenizer()
    task.build_tiny_model(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    vm = mdl.new_value_model(str(tmp_path), dtype=torch.bfloat16, frozen=True)
    assert vm.value_head.weight.dtype == torch.float32 and vm.backbone.embed_tokens.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for _, b in vm.backbone.named_buffers())  # rotary inv_freq kept fp32
    torch.nn.init.normal_(vm.value_head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 90, (2, 40), generator=torch.Generator().manual_seed(1))
    u = vm(ids, torch.ones_like(ids))
    assert u.dtype == torch.float32
    # fp32 resolution: most per-token increments would vanish in bf16 (steps of 2^-8 near 1)
    d = u[:, 1:] - u[:, :-1]
    assert (d != 0).float().mean() > 0.9


def dropout_setup(tmp_path, **dropout):
    tok = task.build_char_tokenizer()
    policy = big_vocab_model(vocab=len(tok), **dropout)
    policy.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tok


def test_dropout_is_off_so_step_zero_kl_and_clipfrac_are_zero(tmp_path):
    """A policy whose config has attention dropout 0.3: loaded as the scripts load it, one DVPO step at
    lr 0 sees KL 0 to the reference (old and reference log-probs agree) and no clipped ratio. The same
    lines on the raw model (dropout on) do not: the check is not vacuous."""
    tok = dropout_setup(tmp_path, attention_dropout=0.3)
    policy, _ = mdl.load_policy(str(tmp_path))
    ref, _ = mdl.load_policy(str(tmp_path), frozen=True)
    prompts = [data.encode_prompt(tok, p) for p in task.builtin_prompts(8, "train")]
    gen = torch.Generator().manual_seed(0)
    batch = mdl.rollout(policy, prompts, tok, 6, 1.0, 1.0, gen, "cpu")
    cfg = dvpo.Config(batch_size=8, minibatch_size=4, micro_batch_size=2, ppo_epochs=2, lr=0.0, warmup_steps=1)
    gvm = mdl.ValueModel(big_vocab_model(vocab=len(tok)).model).eval()
    policy.train()  # as dvpo.main: the trained policy is in train mode
    sc = dvpo.score(policy, ref, gvm, batch, [[] for _ in prompts], 0.1, 1.0, cfg, tok.pad_token_id, "cpu")
    assert sc["kl"].abs().max().item() == 0.0
    opt = torch.optim.AdamW(policy.parameters(), lr=0.0)
    stats, _ = dvpo.update(policy, opt, batch, sc, cfg, 0, 0)
    assert max(s.item() for s in stats["clipfrac"]) == 0.0 and max(s.item() for s in stats["approx_kl"]) == 0.0
    raw = LlamaForCausalLM.from_pretrained(str(tmp_path)).train()  # dropout on, as before the fix
    with torch.no_grad():
        a = mdl.response_logprobs(raw, batch, batch["response"].shape[1])[0]
        b = mdl.response_logprobs(raw, batch, batch["response"].shape[1])[0]
    assert (a - b).abs().max() > 1e-4


MEASURE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import model as mdl, train_utils as tu
from tests.test_memory import big_vocab_model, rollout_batch
B, micro = int(sys.argv[2]), int(sys.argv[3])
policy = big_vocab_model(vocab=32000)
batch = rollout_batch(32000, B=B, P=16, T=64)
with torch.no_grad():
    mdl.frozen_logprobs(policy, {k: v[:2] for k, v in batch.items()}, 64, 1.0, 2)  # warm up: kernels, allocator
before = tu.current_memory(torch.device("cpu"))
tu.reset_peak_memory(torch.device("cpu"))
mdl.frozen_logprobs(policy, batch, 64, 1.0, micro)
print(json.dumps({"peak_delta": tu.peak_memory(torch.device("cpu")) - before}))
"""


def peak_delta(B, micro):
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", MEASURE, ROOT, str(B), str(micro)], env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_delta"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_frozen_logprobs_memory_does_not_grow_with_rows():
    """Vocabulary 32,000, 64 response tokens: 4 rows at a time, 8 or 32 rows in all peak alike; all 32
    at once (micro-batch 0) needs several times more (each micro-batch's logits alone are 33 MB)."""
    small, large, unbounded = peak_delta(8, 4), peak_delta(32, 4), peak_delta(32, 0)
    assert large < 1.25 * small + 8 * 2**20, (small, large)
    assert unbounded > 2.5 * large, (large, unbounded)
