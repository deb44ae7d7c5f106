"""Smoke runs of gvm.py and dvpo.py on tiny configs, single process and under torchrun (gloo):
1-vs-2-process equivalence of GVM training, --explain. (Checkpoints and resume: tests/test_checkpoint.py.)"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

import gvm
import model as mdl
import task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, nproc=1, timeout=300, ok=True):
    """Run a repo script (single process or torchrun); fail with its output on error (ok=False: it must
    fail, with exit code 1 and no traceback)."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                               "--master_port", str(free_port())] if nproc > 1 else []) + args
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    else:
        assert p.returncode == 1 and "Traceback" not in p.stderr, f"{' '.join(cmd)}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """An untrained tiny model saved as if it were the SFT policy (fast; behaviour is irrelevant)."""
    path = str(tmp_path_factory.mktemp("sft"))
    tok = task.build_char_tokenizer()
    task.build_tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


GVM_ARGS = ["--builtin_prompts", "48", "--builtin_eval_prompts", "8", "--batch_size", "8", "--epochs", "1",
            "--lr", "1e-3", "--warmup_steps", "1", "--log_every", "1"]


@pytest.fixture(scope="module")
def tiny_gvm(tiny_sft, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gvm1"))
    run(["gvm.py", "--model", tiny_sft, "--out_dir", out] + GVM_ARGS)
    return out


def test_gvm_outputs_and_load(tiny_gvm):
    s = json.load(open(os.path.join(tiny_gvm, "summary.json")))
    for k in ("eval/pairwise_accuracy", "eval/gold_pairwise_accuracy", "eval/pairwise_accuracy_table",
              "train/pairs", "eval/pairs"):
        assert k in s
    assert set(s["eval/pairwise_accuracy_table"]) == {"final", "mean", "P1", "P5", "P10", "P90", "P95", "P99"}
    assert os.path.exists(os.path.join(tiny_gvm, "pairs_train.jsonl"))
    assert len(open(os.path.join(tiny_gvm, "metrics.jsonl")).readlines()) >= 1
    model, tok, gcfg = gvm.load_gvm(tiny_gvm)
    assert gcfg["lam"] == 0.95 and gcfg["tau_k"] == 0
    head = load_file(os.path.join(tiny_gvm, "value_head.safetensors"))
    assert torch.equal(model.value_head.weight, head["weight"])
    assert head["weight"].abs().sum() > 0  # the zero-initialised head was trained
    u = model(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert u.shape == (1, 3)


def test_gvm_one_vs_two_processes_same_weights(tiny_sft, tiny_gvm, tmp_path):
    """Same global batches on 1 and 2 processes (FSDP2, gloo) -> the same trained weights."""
    out2 = str(tmp_path / "gvm2")
    run(["gvm.py", "--model", tiny_sft, "--out_dir", out2] + GVM_ARGS, nproc=2)
    a = load_file(os.path.join(tiny_gvm, "model.safetensors"))
    b = load_file(os.path.join(out2, "model.safetensors"))
    init = load_file(os.path.join(tiny_sft, "model.safetensors"))
    assert a.keys() == b.keys()
    moved = max((a[k] - init["model." + k]).abs().max().item() for k in a)
    assert moved > 1e-4  # training changed the backbone...
    for k in a:  # ...identically on 1 and 2 processes
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    ha = load_file(os.path.join(tiny_gvm, "value_head.safetensors"))
    hb = load_file(os.path.join(out2, "value_head.safetensors"))
    assert torch.allclose(ha["weight"], hb["weight"], atol=1e-5)
    la = [json.loads(l)["train/td_loss"] for l in open(os.path.join(tiny_gvm, "metrics.jsonl"))]
    lb = [json.loads(l)["train/td_loss"] for l in open(os.path.join(out2, "metrics.jsonl"))]
    assert la == pytest.approx(lb, abs=1e-5)


def test_gvm_tau_conditioning_runs(tiny_sft, tmp_path):
    out = str(tmp_path / "gvm_tau")
    run(["gvm.py", "--model", tiny_sft, "--out_dir", out, "--tau_k", "2"] + GVM_ARGS)
    assert json.load(open(os.path.join(out, "gvm_config.json")))["tau_k"] == 2


def test_gvm_explain(tiny_gvm):
    out = run(["gvm.py", "--explain", "--gvm", tiny_gvm, "--prompt", "52817:", "--response", "12578"])
    assert "w_0 = V(prompt)" in out and "terminal value w_T" in out and "gold reward (built-in task) = 1.000" in out
    assert out.count("'") >= 12  # one quoted token per response token (5 digits + EOS)


def test_gvm_missing_init_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "gvm.py", "--model", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "run `python sft.py` first" in p.stderr


DVPO_ARGS = ["--steps", "2", "--batch_size", "8", "--minibatch_size", "4", "--micro_batch_size", "2",
             "--ppo_epochs", "2", "--eval_prompts", "8", "--max_new_tokens", "8", "--warmup_steps", "1"]


@pytest.mark.parametrize("advantage", ["td", "paper"])
def test_dvpo_smoke_single_process(tiny_sft, tiny_gvm, tmp_path, advantage):
    out = str(tmp_path / "dvpo")
    run(["dvpo.py", "--model", tiny_sft, "--gvm", tiny_gvm, "--out_dir", out, "--advantage", advantage] + DVPO_ARGS)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["train/steps"] == 2 and s["advantage"] == advantage
    for k in ("eval/reward_before", "eval/reward_after", "eval/reward_stderr", "eval/reward_greedy_before",
              "eval/reward_greedy_after", "eval/kl_to_ref", "eval/kl_to_ref_stderr", "train/seconds"):
        assert k in s
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("gvm/return", "kl", "entropy", "clipfrac", "approx_kl", "response_len", "truncated",
              "tokens_per_s", "time/step_s", "memory/peak_gb", "reward"):
        assert k in rows[-1]
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert os.path.exists(os.path.join(out, "checkpoint", "trainer_state.pt"))


def test_dvpo_smoke_torchrun_two_processes(tiny_sft, tiny_gvm, tmp_path):
    out = str(tmp_path / "dvpo2")
    run(["dvpo.py", "--model", tiny_sft, "--gvm", tiny_gvm, "--out_dir", out, "--tau_k", "1"] + DVPO_ARGS, nproc=2)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["train/steps"] == 2 and s["tau_k"] == 1
    init = load_file(os.path.join(tiny_sft, "model.safetensors"))
    final = load_file(os.path.join(out, "model.safetensors"))
    assert max((final[k] - init[k]).abs().max().item() for k in init) > 0  # the policy was updated


def test_dvpo_missing_inputs_say_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "dvpo.py")], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "run `python sft.py` first" in p.stderr


RM_ARGS = ["--epochs", "1", "--batch_size", "8", "--warmup_steps", "1", "--log_every", "1"]


@pytest.fixture(scope="module")
def tiny_rm(tiny_sft, tiny_gvm, tmp_path_factory):
    """reward_model.py on exactly the GVM's pairs and split."""
    out = str(tmp_path_factory.mktemp("rm"))
    run(["reward_model.py", "--model", tiny_sft, "--data", os.path.join(tiny_gvm, "pairs_train.jsonl"),
         "--eval_data", os.path.join(tiny_gvm, "pairs_eval.jsonl"), "--out_dir", out] + RM_ARGS)
    return out


def test_reward_model_outputs_and_load(tiny_rm):
    s = json.load(open(os.path.join(tiny_rm, "summary.json")))
    for k in ("eval/pairwise_accuracy", "eval/bt_loss", "eval/value_std", "train/pairs", "eval/pairs"):
        assert k in s
    cfg = json.load(open(os.path.join(tiny_rm, "rm_config.json")))
    assert cfg["reward"] == "bradley_terry" and 0.0 <= cfg["eval/pairwise_accuracy"] <= 1.0 and cfg["value_std"] > 0
    rows = [json.loads(line) for line in open(os.path.join(tiny_rm, "metrics.jsonl"))]
    assert len(rows) >= 1 and "train/bt_loss" in rows[0]
    rm, _, _ = mdl.load_value_model(tiny_rm, "rm_config.json", "")
    assert rm.value_head.weight.abs().sum() > 0  # the zero-initialised head was trained


def test_reward_model_one_vs_two_processes_same_weights(tiny_sft, tiny_gvm, tiny_rm, tmp_path):
    """Same global batches on 1 and 2 processes (FSDP2, gloo) -> the same trained weights (the BT loss
    is a global pair mean: loss convention). Not the head's bias: r_c - r_r does not depend on it, so its
    gradient is rounding noise, which AdamW turns into steps of about ±lr either way."""
    out2 = str(tmp_path / "rm2")
    run(["reward_model.py", "--model", tiny_sft, "--data", os.path.join(tiny_gvm, "pairs_train.jsonl"),
         "--eval_data", os.path.join(tiny_gvm, "pairs_eval.jsonl"), "--out_dir", out2] + RM_ARGS, nproc=2)
    a, b = load_file(os.path.join(tiny_rm, "model.safetensors")), load_file(os.path.join(out2, "model.safetensors"))
    init = load_file(os.path.join(tiny_sft, "model.safetensors"))
    assert max((a[k] - init["model." + k]).abs().max().item() for k in a) > 1e-4  # training moved the backbone
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ha = load_file(os.path.join(tiny_rm, "value_head.safetensors"))
    hb = load_file(os.path.join(out2, "value_head.safetensors"))
    assert torch.allclose(ha["weight"], hb["weight"], atol=1e-5)


def test_ppo_missing_reward_model_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("out/sft")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "ppo_baseline.py")], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "run `python reward_model.py` first" in p.stderr


PPO_ARGS = DVPO_ARGS


def ppo_run(tiny_sft, tiny_rm, out, extra=(), nproc=1):
    return run(["ppo_baseline.py", "--model", tiny_sft, "--reward", "rm:" + tiny_rm, "--out_dir", out] + PPO_ARGS
               + list(extra),
               nproc=nproc)


def test_ppo_baseline_smoke_single_process(tiny_sft, tiny_rm, tmp_path):
    out = str(tmp_path / "ppo")
    ppo_run(tiny_sft, tiny_rm, out)
    s = json.load(open(os.path.join(out, "summary.json")))
    for k in ("critic_init", "eval/reward_before", "eval/reward_after", "eval/reward_stderr",
              "eval/kl_to_ref", "train/steps", "train/seconds"):
        assert k in s
    assert s["train/steps"] == 2
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"value_loss", "policy_loss", "rm/score", "clipfrac", "reward"} <= set(rows[-1])
    # the policy and the critic are each loadable on their own
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)
    critic, _, ccfg = mdl.load_value_model(os.path.join(out, "critic"), "critic_config.json", "")
    rm, _, _ = mdl.load_value_model(tiny_rm, "rm_config.json", "")
    assert ccfg["role"] == "critic"
    assert not torch.equal(critic.value_head.weight, rm.value_head.weight)  # the critic was trained from the RM
    index = FileSystemReader(os.path.join(out, "checkpoint")).read_metadata().state_dict_metadata  # DCP's index
    assert {"critic.model.value_head.weight", "critic.optim.state.value_head.weight.exp_avg"} <= set(index)


def test_ppo_baseline_torchrun_two_processes(tiny_sft, tiny_rm, tmp_path):
    out = str(tmp_path / "ppo2")
    ppo_run(tiny_sft, tiny_rm, out, nproc=2)
    assert json.load(open(os.path.join(out, "summary.json")))["train/steps"] == 2
