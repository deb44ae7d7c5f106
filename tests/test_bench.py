"""bench.py: the analytic memory / FLOPs model on hand-computed values, and smoke runs of the whole
benchmark on the tiny preset (one process per method, and 2-process torchrun with gloo) that must
write bench.json with every reported key and positive numbers. No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import projection  # noqa: E402
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
TINY = ["--preset", "tiny", "--repeats", "1", "--warmup", "1", "--steps", "1", "--batch_size", "4",
        "--minibatch_size", "2", "--micro_batch_size", "1", "--prompt_len", "6", "--response_len", "5",
        "--ppo_epochs", "2", "--threads", "1"]


# ---------------------------------------------------------------- analytic model

def test_bytes_per_param():
    assert bench.bytes_per_param() == (16, 4)  # fp32 w + grad + AdamW m, v; fp32 frozen
    assert bench.bytes_per_param(world=8) == (2, 0.5)  # FSDP2 shards all of it
    assert bench.bytes_per_param(frozen_bytes=2) == (16, 2)
    assert bench.deepspeed_bytes_per_param(1, 8) == (5.5, 2.0)  # 2 + 2 + 12/8; bf16 frozen, replicated
    assert bench.deepspeed_bytes_per_param(3, 8) == (2.0, 0.25)


def test_model_memory_and_ratio():
    n = 1_000_000
    assert bench.model_memory("dvpo", n, n, 16, 4) == 16 * n + 8 * n  # policy trained; ref + GVM frozen
    assert bench.model_memory("ppo", n, n, 16, 4) == 32 * n + 8 * n  # + critic trained, RM frozen
    for world in (1, 8):  # (T + 2F) / (2T + 2F) = 24/40, whatever the sharding
        T, F = bench.bytes_per_param(world)
        assert bench.model_memory("dvpo", n, n, T, F) / bench.model_memory("ppo", n, n, T, F) == pytest.approx(0.60)
    assert bench.model_memory("dvpo", n, n, 16, 2) / bench.model_memory("ppo", n, n, 16, 2) == pytest.approx(20 / 36)
    T, F = bench.deepspeed_bytes_per_param(1, 8)  # the paper's 3B setup: (5.5 + 4) / (11 + 4)
    assert bench.model_memory("dvpo", n, n, T, F) / bench.model_memory("ppo", n, n, T, F) == pytest.approx(9.5 / 15)
    a = bench.analytic(n, n, tokens=100, ppo_epochs=4, world=1)
    assert a["memory_ratio"] == pytest.approx(0.60)
    assert a["memory_bytes"]["ppo"] == 40 * n


def test_step_flops_hand_values():
    # N = 1 parameter, D = 1 token: forward 2, forward+backward 6
    assert bench.step_flops("dvpo", 1, 1, 1, 4) == {"generation": 2, "score": 6, "update": 24}
    assert bench.step_flops("ppo", 1, 1, 1, 4) == {"generation": 2, "score": 8, "update": 48}
    f = bench.step_flops("ppo", 10, 3, 7, 2)  # unequal sizes: 2·D·(2Nπ + 2Nv), E·6·(Nπ + Nv)·D
    assert f == {"generation": 140, "score": 2 * 7 * 26, "update": 2 * 6 * 13 * 7}


TOY = dict(hidden=4, inter=8, layers=2, kv=2, vocab=10, tied=False)


def test_llama_params_hand_values_and_hf_counts():
    # block 2·16 + 2·4·2 + 3·4·8 + 2·4 = 152; backbone 2·152 + 10·4 + 4 = 348; + LM head 40; value head 5
    assert projection.llama_params(TOY) == (388, 353, 152)
    assert projection.llama_params(dict(TOY, tied=True))[0] == 348
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    for name, s in projection.LLAMA.items():  # the formula counts what HF builds, exactly
        cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                          num_attention_heads=s["hidden"] // 128, num_key_value_heads=s["kv"] // 128,
                          vocab_size=s["vocab"], tie_word_embeddings=s["tied"])
        assert projection.shape_of(cfg) == s
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        n_pi, n_v, _ = projection.llama_params(s)
        assert sum(p.numel() for p in model.parameters()) == n_pi, name
        assert sum(p.numel() for p in model.model.parameters()) + s["hidden"] + 1 == n_v, name


def test_logits_and_kv_cache_bytes_hand_values(monkeypatch):
    # micro 2, T 3, V 10, bf16: K = 2·4·10 = 80 logits kept; one chunk of E = 2·3·10 = 60 fp32 elements
    assert bench.logits_bytes(2, 3, 10, 2, grad=False) == 2 * 80 + 10 * 60  # + chunk (2), x/temperature, log-softmax
    assert bench.logits_bytes(2, 3, 10, 2, grad=True) == max(2 * 80 + 14 * 60, 4 * 80 + 8 * 60)  # forward: 1000
    monkeypatch.setattr(bench.model, "LOGITS_CHUNK", 20)  # one position per chunk: E = 20, the backward's 3 copies
    assert bench.logits_bytes(2, 3, 10, 2, grad=True) == max(2 * 80 + 14 * 20, 6 * 80 + 8 * 20) == 640
    assert bench.logits_bytes(2, 3, 10, 4, grad=False) == 4 * 80 + 12 * 20
    assert bench.kv_cache_bytes(3, 5, 2, 2, 2) == 3 * 5 * 2 * 2 * 2 * 2  # rows · tokens · layers · (k, v) · kv · a


def test_activation_bytes_hand_values():
    assert projection.block_values(TOY, 5) == 11 * 4 + 4 * 8 + 5  # per token and block, with a (B, 1, L, L) mask
    # 2 sequences of 3 tokens, T = 2, bf16: blocks 2·3·(2·79)·2 = 1896; logits K = 60, E = 40: 120 + 14·40 = 680
    assert projection.activation_bytes(TOY, 2, 3, 2, False, 2) == 1896 + 680
    assert projection.activation_bytes(TOY, 2, 3, 2, True, 2) == 2 * 3 * (2 * 4 + 79) * 2 + 680  # inputs + 1 block
    assert projection.activation_bytes(TOY, 2, 3, 2, False, 2, lm_head=False) == 1896 + 2 * 3 * 4 * (2 + 4)
    assert projection.activation_bytes(TOY, 2, 3, 2, False, 4) == 3792 + max(4 * 60 + 16 * 40, 8 * 60 + 8 * 40)


def test_per_rank_memory_hand_values():
    # world 2, CUDA (2-byte params, activations, frozen), micro 2 of 3 tokens (prompt 1 + response 2), rollout 4
    d = projection.per_rank_memory("dvpo", TOY, 2, 2, 4, 3, 2, cuda=True, micro_steps=2, eval_batch=4)
    assert d["state"] == 8 * 388 + 1 * (388 + 353) == 3845  # 16/2 per trained, 2/2 per frozen parameter
    G, gathered = 4 * 388 / 2, 2 * (2 * 152 + 80 + 4)  # sharded gradients; 2 blocks + embeddings, LM head, norm
    # generation: the gathered policy + the larger of prefill (KV of the prompt + 4·1·(2H + 3I)·2) and the
    # full KV cache + a decode step's logits (4·10·(2 + 8))
    generate = 2 * 388 + max(4 * 1 * 2 * 2 * 2 * 2 + 4 * 32 * 2, 4 * 3 * 2 * 2 * 2 * 2 + 4 * 10 * 10)
    assert d["rollout"] == 3845 - G + generate
    forward = gathered + 2 * 3 * 32 * 2 + (2 * 60 + 10 * 40)  # a frozen micro-batch: block transient + logits
    assert d["score"] == 3845 - G + forward and d["eval"] == 3845 - G + max(generate, forward)
    assert d["update"] == d["peak"] == 3845 + gathered + 2576  # 2 micro-batches: on top of the first's gradients
    assert d["optimizer"] == 3845 + 4 * 388 / 2  # AdamW's foreach temporaries: one copy of the shards
    last = projection.per_rank_memory("dvpo", TOY, 2, 2, 4, 3, 2, cuda=True, micro_steps=2, grad_sync="last")
    assert last["update"] == d["update"] + 4 * 388 - G and last["eval"] == 0  # unsharded fp32 gradients
    assert (d["load_rank0"], d["load_other"]) == ((4 * 388 + 2 * 741) / 2 + 4 * 388, 1517 + 40 * 4)
    p = projection.per_rank_memory("ppo", TOY, 2, 2, 4, 3, 2, cuda=True, micro_steps=1)
    assert p["state"] == 6669 and p["rollout"] == 6669 - 4 * 741 / 2 + generate
    # one micro-batch: the critic's backward (2040 of activations) runs while the policy's gradients exist
    assert p["update"] == 6669 + gathered + max(2576 - 4 * 741 / 2, 2040 - 4 * 353 / 2)
    one = projection.per_rank_memory("dvpo", TOY, 1, 2, 4, 3, 2, cuda=False)  # CPU, one process: no FSDP2
    assert one["state"] == 16 * 388 + 4 * 741 == 9172
    assert one["rollout"] == 9172 - 4 * 388 + max(4 * 2 * 2 * 2 * 4 + 4 * 32 * 4, 4 * 3 * 2 * 2 * 2 * 4 + 4 * 10 * 12)
    assert one["score"] == 9172 - 4 * 388 + 2 * 3 * 32 * 4 + (4 * 60 + 12 * 40)
    assert one["update"] == one["peak"] == 9172 + 4672 - 4 * 388  # no gradient exists before the backward
    assert one["optimizer"] == 9172 + 2 * 4 * 40  # the per-tensor loop: two temporaries of the LM head's size
    assert one["load_rank0"] == one["load_other"] == 4 * 388 + 4 * 741
    small = projection.per_rank_memory("dvpo", TOY, 1, 1, 1, 1, 1, cuda=False)  # activations below the gradients
    assert small["update"] == small["state"] and small["peak"] == small["optimizer"]
    assert "| 8B (8.03B) | DVPO |" in projection.projection_table() and "60.49 GB" in projection.projection_table()
    assert "README example: Qwen2.5-0.5B, 1 GPU | DVPO |" in projection.scenario_table()


@pytest.mark.parametrize("E, with_gen, without_gen", [(4, 16 / 29, 15 / 28), (1, 7 / 11, 6 / 10), (2, 10 / 17, 9 / 16)])
def test_time_ratio_formula(E, with_gen, without_gen):
    """Forward units: DVPO = 1 (generation) + 3 (old, ref, GVM) + 3E, PPO = 1 + 4 (+ RM, critic) + 6E."""
    a = bench.analytic(5_000, 5_000, tokens=64, ppo_epochs=E, world=1)
    assert a["time_ratio"] == pytest.approx(with_gen)
    assert a["time_ratio_excl_generation"] == pytest.approx(without_gen)
    assert a["phase_ratio"]["score"] == pytest.approx(3 / 4)  # no RM / critic forward
    assert a["phase_ratio"]["update"] == pytest.approx(0.5)  # no critic forward + backward
    assert a["phase_ratio"]["generation"] == pytest.approx(1.0)


def test_presets_are_about_their_names():
    """Per layer 4·H² + 3·H·I (+ norms); with vocab 100 the embeddings are negligible."""
    blocks = {k: v["num_hidden_layers"] * (4 * v["hidden_size"] ** 2 + 3 * v["hidden_size"] * v["intermediate_size"])
              for k, v in bench.PRESETS.items() if v}
    for name, target in (("50m", 50e6), ("150m", 150e6), ("1b", 1.0e9), ("3b", 3.0e9)):
        assert 0.9 < blocks[name] / target < 1.1, name


# ---------------------------------------------------------------- smoke runs

def run_bench(tmp_path, extra=(), launcher=()):
    out = str(tmp_path / "bench")
    cmd = [sys.executable, *launcher, os.path.join(ROOT, "bench.py"), *TINY, "--out_dir", out, *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.load(open(os.path.join(out, "bench.json"))), p.stdout


def check_result(res, stdout):
    for m in bench.METHODS:  # GRPO measured beside DVPO and PPO by default
        r = res[m]
        for k in ("peak_memory_bytes", "load_peak_bytes", "models_bytes", "peak_memory_default_malloc_bytes",
                  "step_time_s", "step_cpu_s"):
            assert r[k] > 0, (m, k)
        for k in bench.PHASES:
            assert r["phases"][k] > 0, (m, k)
        assert len(r["repeats"]) == 1 and len(r["memory_runs"]) == 1
    # the PPO step does more in every phase but generation: RM + critic forwards, critic update
    for k in ("ratio/memory", "ratio/step_time", "ratio/cpu_time", "analytic/memory_ratio", "analytic/time_ratio",
              "ratio/grpo_memory", "ratio/grpo_step_time", "ratio/grpo_dvpo_step_time"):
        assert res[k] > 0, k
    assert res["analytic"]["memory_bytes"]["grpo"] == res["analytic"]["memory_bytes"]["dvpo"]
    assert res["analytic"]["flops"]["grpo"] == res["analytic"]["flops"]["dvpo"]  # equal samples per step
    assert "| | DVPO | PPO | GRPO | DVPO/PPO | GRPO/PPO | analytic DVPO/PPO |" in stdout
    # E = 2: (1 + 3 + 6) / (1 + 4 + 12); the tiny policy's LM head makes N_π a little larger than N_v
    assert res["analytic/time_ratio"] == pytest.approx(10 / 17, rel=0.02)
    assert res["params"]["policy"] > 0 and res["params"]["value"] > 0
    assert res["preset"] == "tiny" and res["threads"] == 1 and res["device"] == "cpu" and res["torch"]
    assert "| step peak memory per rank, net" in stdout and "| step time, median (s) |" in stdout


def test_bench_smoke_tiny(tmp_path):
    res, stdout = run_bench(tmp_path)
    check_result(res, stdout)
    assert res["nproc"] == 1
    assert res["dvpo"]["per_rank"][0]["base"] > 0  # the baseline RSS the net figures subtract
    rows = projection.bench_table(res).splitlines()  # scripts/projection.py --bench: per rank, then per_rank_memory
    assert rows[2].startswith("| 0 | ") and rows[3].startswith("| analytic | ")


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_bench_one_measurement_torchrun_two_ranks(tmp_path):
    """One PPO measurement under torchrun (FSDP2, gloo): every model sharded, peak = max over ranks.
    (`torchrun ... bench.py` without --method relaunches this per method; checked by hand, ~35 s.)"""
    path = str(tmp_path / "ppo.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(bench.free_port()), os.path.join(ROOT, "bench.py"), *TINY, "--method", "ppo",
           "--result", path, "--out_dir", str(tmp_path / "bench")]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    r = json.load(open(path))
    assert r["world"] == 2 and r["method"] == "ppo" and r["peak_memory_bytes"] > 0 and r["models_bytes"] > 0
    assert r["step_times_s"][0] > 0 and r["phases"][0]["update"] > 0 and len(r["per_rank"]) == 2
    for x in r["per_rank"]:  # every rank holds a part of every model, and the largest tensor is more than a shard
        assert x["load_peak"] > 0 and 0 < x["shards"] and x["largest_tensor"] > 0
