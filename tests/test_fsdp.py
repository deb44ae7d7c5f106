"""fsdp_utils.py: one SFT step under `torchrun --nproc_per_node 2` (FSDP2, gloo, CPU) must give the
same gradients, loss, saved weights and greedy rollouts as the same step in one process; sharded
loading (fsdp_utils.on_device) must give the files' exact weights and the same losses and gradients."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import task

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_fsdp_step.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, nproc=None, timeout=180):
    """Run the script (under torchrun when nproc is given) in its own process group, killed as a
    whole on timeout so no rank is left behind."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, SCRIPT, *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), SCRIPT, *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"timed out after {timeout}s:\n{out[-6000:]}")
    errors = [line for line in out.splitlines() if "Error:" in line]  # each rank's exception, first
    assert p.returncode == 0, "\n".join(errors[-8:]) + "\n...\n" + out[-3000:]
    return out


def load(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_two_process_fsdp_step_matches_single_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run([str(one)])
    run([str(two)], nproc=2)
    r1, r2 = json.load(open(one / "result.json")), json.load(open(two / "result.json"))
    assert (r1["world"], r2["world"]) == (1, 2)
    assert r1["n_tokens"] == r2["n_tokens"]
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)  # the global token mean, reduced over ranks
    assert (r1["rank_mean"], r2["rank_mean"]) == (0.0, 0.5)  # reduce_metrics averages over ranks
    assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5)
    assert r2["generated"] == r1["generated"]  # greedy rollouts inside gathered(), per rank, after the step

    g1, g2 = load(one / "grads.safetensors"), load(two / "grads.safetensors")
    assert set(g1) == set(g2)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=1e-4, msg=k)

    w1, w2 = load(one / "model" / "model.safetensors"), load(two / "model" / "model.safetensors")
    init = task.build_tiny_model(task.build_char_tokenizer(), seed=0).state_dict()
    assert set(w1) == set(w2) == set(init)
    for k in w1:
        assert torch.allclose(w2[k], w1[k], atol=1e-5, rtol=0), k
        assert (w1[k] - init[k]).abs().max() > 5e-5, k  # the step really happened (lr 1e-4)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (two / "model" / name).is_file()


def test_load_full_state_dict_leaves_callers_dict_intact():
    """Loading one full state dict into two sharded models (e.g. policy and reference from one SFT
    checkpoint). Under FSDP, set_model_state_dict(broadcast_from_rank0=True) replaces the dict's
    tensors by DTensors in place, and a second load then fails on rank 0 while rank 1 waits."""
    run(["--reuse"], nproc=2, timeout=120)


def test_masked_batch_norm_statistics_are_global():
    """One row of the docs/algorithm.md §10 masked-BN vector per rank: the all-reduced statistics
    give each rank its rows of the single-process result."""
    run(["--bn"], nproc=2, timeout=120)


def write_models(folder, tied: bool) -> tuple[str, str]:
    """A tiny Llama (grouped-query attention; embeddings tied or not) as an HF folder, and a value
    model folder on its backbone with a random head (the head's 1-row weight leaves rank 1 an empty
    shard)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig
    tok = task.build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=40, intermediate_size=70, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    path, value_path = str(folder / "policy"), str(folder / "value")
    model.save_pretrained(path)
    model.model.save_pretrained(value_path)
    for p in (path, value_path):
        tok.save_pretrained(p)
    head = {"weight": torch.randn(1, 40), "bias": torch.randn(1)}
    save_file(head, os.path.join(value_path, "value_head.safetensors"))
    with open(os.path.join(value_path, "value_config.json"), "w") as f:
        json.dump({}, f)
    return path, value_path


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_loading_one_vs_two_processes(tmp_path, tied):
    """Policy, frozen bf16 reference, value model and new value model loaded by train_utils on 1 and
    2 processes: exact weights and buffers (asserted in the script), and the same loss and gradients
    after two micro-batches with gradient sync off on the first."""
    path, value_path = write_models(tmp_path, tied)
    one, two = tmp_path / "one", tmp_path / "two"
    run(["--load", str(one), path, value_path])
    run(["--load", str(two), path, value_path], nproc=2)
    r1, r2 = json.load(open(one / "result.json")), json.load(open(two / "result.json"))
    assert (r1["world"], r2["world"]) == (1, 2) and r1["tied"] == r2["tied"] == tied
    for k in ("policy_loss", "value_loss"):
        assert r2[k] == pytest.approx(r1[k], rel=1e-5), k
    g1, g2 = load(one / "grads.safetensors"), load(two / "grads.safetensors")
    assert set(g1) == set(g2) and any(k.startswith("value.value_head") for k in g1)
    for k in g1:  # fp32 sums in another order: equal to ~1e-7 of each gradient's scale
        scale = g1[k].abs().max()
        assert scale > 0 and (g2[k] - g1[k]).abs().max() <= 1e-5 * scale, k
