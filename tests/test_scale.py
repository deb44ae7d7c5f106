"""The scale rule of docs/algorithm.md §7 on real (tiny) models: a value model records the std of its
terminal value over held-out responses, RL divides by it, so scaling a value model's head by c
leaves the advantages DVPO and PPO train on unchanged. And the NaN/inf guard, end to end."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import dvpo
import evaluation
import fsdp_utils as fu
import gvm
import model as mdl
import ppo_baseline
import reward_model
import task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 7.5  # the head scale factor: a value model trained "the same" but with 7.5× larger outputs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("policy"))
    tok = task.build_char_tokenizer()
    task.build_tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2).save_pretrained(path)
    tok.save_pretrained(path)
    policy, _ = mdl.load_policy(path)
    value = mdl.new_value_model(path)
    torch.nn.init.normal_(value.value_head.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    torch.nn.init.constant_(value.value_head.bias, 0.3)
    scaled = copy.deepcopy(value)
    with torch.no_grad():
        scaled.value_head.weight.mul_(C)
        scaled.value_head.bias.mul_(C)
    prompts = task.builtin_prompts(8, "train")
    ids = [data.encode_prompt(tok, p) for p in prompts]
    batch = mdl.rollout(policy, ids, tok, 8, 1.0, 1.0, torch.Generator().manual_seed(0), "cpu")
    held_rows = [{"prompt": p, "chosen": "1234", "rejected": "4321", "policy": None} for p in prompts[:6]]
    ref = copy.deepcopy(policy)  # a reference that differs from the policy, so that the KL term (β) matters
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return {"tok": tok, "policy": policy, "ref": ref, "value": value.eval(),
            "scaled": scaled.eval(), "batch": batch, "held_rows": held_rows}


def gvm_recorded_std(model, setup) -> float:
    """What gvm.py stores as value_std for this model: gvm.evaluate on held-out pairs."""
    cfg = gvm.Config()
    held = gvm.encode_rows(setup["held_rows"], "preference", setup["tok"], cfg, data.TruncationStats())
    ev = gvm.evaluate(model, held, "preference", gvm.tau_pools(held, "preference"), cfg, setup["tok"].pad_token_id,
                      "cpu", lambda e, k: 1.0 if k == "chosen" else -1.0)
    return ev["eval/value_std"]


@pytest.mark.parametrize("advantage", ["td", "paper"])
def test_scaling_the_gvm_head_leaves_normalized_advantages_unchanged(setup, advantage):
    s, s_scaled = gvm_recorded_std(setup["value"], setup), gvm_recorded_std(setup["scaled"], setup)
    assert s > 0 and s_scaled == pytest.approx(C * s, rel=1e-5)  # the recorded statistic scales with the head
    cfg = dvpo.Config(advantage=advantage)
    no_tau = [[] for _ in setup["batch"]["prompt_ids"]]
    args = (setup["policy"], setup["ref"])
    a = dvpo.score(*args, setup["value"], setup["batch"], no_tau, 0.2, s, cfg, 0, "cpu")
    b = dvpo.score(*args, setup["scaled"], setup["batch"], no_tau, 0.2, s_scaled, cfg, 0, "cpu")
    torch.testing.assert_close(b["w"], a["w"], rtol=1e-4, atol=1e-5)  # the normalized chain
    torch.testing.assert_close(b["adv"], a["adv"], rtol=1e-4, atol=1e-4)
    if advantage == "td":  # without the rule the same β is a different regularizer: advantages change
        raw = dvpo.score(*args, setup["scaled"], setup["batch"], no_tau, 0.2, 1.0, cfg, 0, "cpu")
        assert (raw["adv"] - a["adv"]).abs().max() > 1e-2


def test_scaling_the_reward_model_head_leaves_ppo_unchanged(setup):
    """The RM's recorded std (reward_model.evaluate: its scores over held-out responses) scales with its
    head; the score is divided by it and the critic starts as the RM with its head divided by it
    (ppo_baseline.main)."""
    held = data.encode_pairs(setup["held_rows"], setup["tok"], 512, 512, data.TruncationStats())
    out = {}
    for name in ("value", "scaled"):
        rm = setup[name]
        s = reward_model.evaluate(rm, held, setup["tok"].pad_token_id, "cpu", 32)["eval/value_std"]
        critic = copy.deepcopy(rm)
        ppo_baseline.init_critic(critic, s)
        out[name] = (s, ppo_baseline.score(setup["policy"], setup["ref"], rm, critic, setup["batch"], 0.2, s,
                                           ppo_baseline.Config(), "cpu"))
    (s, a), (s2, b) = out["value"], out["scaled"]
    assert s2 == pytest.approx(C * s, rel=1e-5)
    for k in ("score", "old_values", "returns", "adv"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)


def test_rank_correlation_hand_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert evaluation.rank_correlation(x, x * 10) == pytest.approx(1.0)
    assert evaluation.rank_correlation(x, -x) == pytest.approx(-1.0)
    # ties share their average rank: ranks of [0, 0, 1, 1] are [0.5, 0.5, 2.5, 2.5]
    assert evaluation.rank_correlation(x, torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.894427, abs=1e-6)
    assert math.isnan(evaluation.rank_correlation(x, torch.ones(4)))  # a constant has no ranks


def test_undefined_metric_is_left_out_of_the_mean():
    """A reward correlation is nan on a batch whose rewards are all equal: it must not turn the logged
    row into NaN (invalid JSON) nor change the other metrics. (Across ranks, the mean of the defined ones.)"""
    m = fu.reduce_metrics({"loss": 0.25, "gvm/reward_corr": float("nan"), "kl": 1.5}, torch.device("cpu"))
    assert m == {"loss": 0.25, "kl": 1.5}
    assert fu.reduce_metrics({"gvm/reward_corr": 0.5}, torch.device("cpu")) == {"gvm/reward_corr": 0.5}


def test_nan_guard_stops_with_one_line(setup, tmp_path):
    """A GVM that outputs NaN: dvpo.py stops at step 1 naming the quantity, with no traceback and
    without writing a checkpoint or final model."""
    model_dir, gvm_dir = str(tmp_path / "policy"), str(tmp_path / "gvm")
    setup["policy"].save_pretrained(model_dir)
    setup["tok"].save_pretrained(model_dir)
    bad = copy.deepcopy(setup["value"])
    with torch.no_grad():
        bad.value_head.bias.fill_(float("nan"))
    checkpoint.save_value_model(bad, setup["tok"], gvm_dir, gvm.GVM_CONFIG, {"tau_k": 0, "value_std": 1.0})
    out = str(tmp_path / "dvpo")
    p = subprocess.run([sys.executable, "dvpo.py", "--model", model_dir, "--gvm", gvm_dir, "--out_dir", out,
                        "--steps", "2", "--batch_size", "4", "--minibatch_size", "4", "--micro_batch_size", "4",
                        "--eval_prompts", "4", "--max_new_tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode != 0
    assert "dvpo.py: step 1: non-finite advantage" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "checkpoint")) and not os.path.exists(os.path.join(out, "summary.json"))
    assert json.load(open(os.path.join(out, "train_config.json")))["steps"] == 2


def test_chance_warning_is_two_standard_errors_of_chance():
    """The warning the RL scripts print before training (docs/algorithm.md §7): accuracy within 2·0.5/√n of 0.5."""
    warn = mdl.chance_warning
    assert warn({"eval/pairwise_accuracy": 0.5, "eval/pairs": 12}, "g").startswith("warning: g ranked its 12")
    assert warn({"eval/pairwise_accuracy": 0.570, "eval/pairs": 128}, "r")  # 0.070 < 2 · 0.044 (the sentiment RM)
    assert warn({"eval/pairwise_accuracy": 0.609, "eval/pairs": 128}, "g") == ""  # 0.109 > 0.088 (its GVM)
    assert warn({"eval/pairwise_accuracy": 0.59, "eval/pairs": 100}, "g")  # 0.09 < 0.1: just inside
    assert warn({"eval/pairwise_accuracy": 0.61, "eval/pairs": 100}, "g") == ""
    assert warn({"eval/pairwise_accuracy": 0.30, "eval/pairs": 100}, "g")  # worse than chance warns too
    assert warn({"value_std": 1.0}, "old") == ""  # trained before the statistic, or on scores: nothing to say
