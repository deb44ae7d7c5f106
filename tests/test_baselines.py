"""The paper's other baselines (issue 20): the group estimators of grpo_baseline.py against plain loops on
hand-made groups (an all-equal group gives zero advantage, never NaN), their edge cases refused or
degraded clearly, the per-token advantage with the KL reward-to-go, the within-prompt correlation, the DPO
loss against a hand-computed value, and short runs of grpo_baseline.py, dpo_baseline.py and the PPO
controls (--reward gvm:PATH, --critic_init, --critic_warmup_steps), one process and two."""
import json
import math
import os
import statistics

import pytest
import torch

import dpo_baseline
import grpo_baseline
import model as mdl
from tests.test_scripts import DVPO_ARGS, run, tiny_gvm, tiny_rm, tiny_sft  # noqa: F401 (fixtures)

T_ = torch.tensor


def loop_advantage(scores, n, estimator, baseline=None):
    """Plain python, one group at a time, from the estimators' definitions."""
    out = []
    for g in range(0, len(scores), n):
        s = scores[g:g + n]
        for i, x in enumerate(s):
            if estimator == "grpo":
                sd = statistics.stdev(s) if n > 1 else 0.0
                out.append((x - statistics.mean(s)) / (sd + 1e-8))
            elif estimator == "dr_grpo":
                out.append(x - statistics.mean(s))
            elif estimator == "rloo":
                out.append(x - (sum(s) - x) / (n - 1))
            else:
                out.append(x - baseline[g + i])
    return out


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "remax"])
def test_group_advantages_match_the_definitions(estimator):
    scores = [0.3, -1.2, 0.5, 2.0, 0.7, 0.7, 0.7, 0.7, -0.1, 0.4, 0.0, 1.1]  # 3 groups of 4; the second all equal
    baseline = [0.1] * 4 + [0.7] * 4 + [-2.0] * 4
    got = grpo_baseline.group_advantages(T_(scores, dtype=torch.float64), 4, estimator,
                                         T_(baseline, dtype=torch.float64))
    want = loop_advantage(scores, 4, estimator, baseline)
    assert torch.allclose(got, T_(want, dtype=torch.float64), atol=1e-9)
    assert torch.isfinite(got).all() and (got[4:8] == 0).all()  # the all-equal group: zero, not NaN


def test_group_advantages_hand_values():
    s = T_([1.0, 2.0, 3.0, 6.0])  # mean 3, sample std sqrt(14/3) = 2.160247
    assert torch.allclose(grpo_baseline.group_advantages(s, 4, "dr_grpo"), T_([-2.0, -1.0, 0.0, 3.0]))
    assert torch.allclose(grpo_baseline.group_advantages(s, 4, "rloo"), T_([-8 / 3, -4 / 3, 0.0, 4.0]))
    assert torch.allclose(grpo_baseline.group_advantages(s, 4, "grpo"), T_([-2.0, -1.0, 0.0, 3.0]) / 2.160247,
                          atol=1e-5)
    assert torch.allclose(grpo_baseline.group_advantages(s, 1, "remax", T_([1.0, 1.0, 5.0, 5.0])),
                          T_([0.0, 1.0, -2.0, 1.0]))


def test_sequence_advantages_add_the_kl_reward_to_go():
    adv_seq = T_([0.5, -1.0])
    r_kl = T_([[0.1, -0.2, 0.3, 9.0], [0.05, 0.05, 9.0, 9.0]])
    mask = T_([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    got = grpo_baseline.sequence_advantages(adv_seq, r_kl * mask, mask, 1.0)
    want = T_([[0.5 + 0.2, 0.5 + 0.1, 0.5 + 0.3, 0], [-1.0 + 0.1, -1.0 + 0.05, 0, 0]])
    assert torch.allclose(got, want)
    # γ < 1: the terminal estimate is discounted from the last token back, like any terminal reward
    got = grpo_baseline.sequence_advantages(adv_seq, torch.zeros(2, 4), mask, 0.5)
    assert torch.allclose(got, T_([[0.125, 0.25, 0.5, 0], [-0.5, -1.0, 0, 0]]))


def test_within_group_correlation():
    s = T_([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    r = T_([0.1, 0.2, 0.3, 0.4, 0.4, 0.3, 0.2, 0.1, 0.0, 1.0, 2.0, 3.0])  # +1, -1, undefined (constant scores)
    assert grpo_baseline.within_group_correlation(s, r, 4) == pytest.approx(0.0)
    assert grpo_baseline.within_group_correlation(s[:4], r[:4], 4) == pytest.approx(1.0)
    assert math.isnan(grpo_baseline.within_group_correlation(s[8:], r[8:], 4))
    # a scorer with a different offset per prompt but the right order within each: perfect within prompts
    offsets = T_([0.0] * 4 + [10.0] * 4)
    assert grpo_baseline.within_group_correlation(r[:8] * 0 + T_([1.0, 2, 3, 4, 4, 3, 2, 1]) + offsets, r[:8],
                                                  4) == pytest.approx(1.0)


def test_dpo_loss_hand_value():
    """β = 0.5, log-ratios chosen (-1 - -1.5) = 0.5, rejected (-2 - -1.2) = -0.8: margin 0.5 · 1.3 = 0.65,
    -log σ(0.65) = 0.420055; a second pair with margin -0.5 · 0.4 = -0.2: -log σ(-0.2) = 0.798139."""
    loss, margin = dpo_baseline.dpo_loss(T_([-1.0, -3.0]), T_([-2.0, -2.0]), T_([-1.5, -3.0]), T_([-1.2, -2.4]), 0.5, 2)
    assert torch.allclose(margin, T_([0.65, -0.2]))
    assert loss.item() == pytest.approx((0.420055 + 0.798139) / 2, abs=1e-5)
    assert dpo_baseline.sequence_logprobs(T_([[-1.0, -2.0, -9.0]]), T_([[1.0, 1.0, 0.0]])).item() == -3.0


def test_load_reward_refuses_a_bad_spec():
    import train_utils as tu
    for bad in ("out/rm", "critic:out/rm", "rm:"):
        with pytest.raises(tu.ConfigError, match="--reward must be rm:PATH"):
            mdl.parse_reward(bad)


GRPO_ARGS = DVPO_ARGS + ["--group_size", "4"]


@pytest.mark.parametrize("estimator", ["grpo", "remax"])
def test_grpo_baseline_smoke(tiny_sft, tiny_rm, tmp_path, estimator):
    out = str(tmp_path / estimator)
    extra = ["--group_size", "1"] if estimator == "remax" else []
    run(["grpo_baseline.py", "--model", tiny_sft, "--reward", f"rm:{tiny_rm}", "--out_dir", out,
         "--estimator", estimator] + GRPO_ARGS + extra)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["train/steps"] == 2 and s["estimator"] == estimator and "eval/reward_after" in s
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"rm/score", "clipfrac", "policy_loss", "reward"} <= set(rows[-1])  # (the untrained policy's gold is
    # 0 everywhere: the reward correlations are undefined here and rightly absent; tested on hand values above)


def test_grpo_baseline_refuses_groups_of_one(tiny_sft, tiny_rm, tmp_path):
    out = run(["grpo_baseline.py", "--model", tiny_sft, "--reward", f"rm:{tiny_rm}", "--out_dir", str(tmp_path),
               "--estimator", "rloo", "--group_size", "1"] + DVPO_ARGS, ok=False)
    assert "--group_size must be at least 2" in out


def test_grpo_baseline_on_the_gvm_two_processes(tiny_sft, tiny_gvm, tmp_path):
    out = str(tmp_path / "g2")
    run(["grpo_baseline.py", "--model", tiny_sft, "--reward", f"gvm:{tiny_gvm}", "--out_dir", out] + GRPO_ARGS,
        nproc=2)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["train/steps"] == 2 and s["reward"].startswith("gvm:") and "gvm/scale" in s


def test_ppo_controls(tiny_sft, tiny_gvm, tiny_rm, tmp_path):
    """PPO on the GVM's w_T with the critic warming up alone for a step (the policy must not move in it),
    and PPO on the RM with its critic pretrained as the GVM."""
    out = str(tmp_path / "ppo_gvm")
    run(["ppo_baseline.py", "--model", tiny_sft, "--reward", f"gvm:{tiny_gvm}", "--critic_warmup_steps", "1",
         "--out_dir", out] + DVPO_ARGS)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[0]["grad_norm"] == 0.0 and rows[0]["critic_grad_norm"] > 0 and rows[1]["grad_norm"] > 0
    assert "gvm/score" in rows[0]
    out = str(tmp_path / "ppo_gvmcritic")
    run(["ppo_baseline.py", "--model", tiny_sft, "--reward", f"rm:{tiny_rm}", "--critic_init", f"gvm:{tiny_gvm}",
         "--out_dir", out] + DVPO_ARGS)
    assert json.load(open(os.path.join(out, "summary.json")))["critic_init"] == f"gvm:{tiny_gvm}"


def test_dpo_baseline_smoke(tiny_sft, tiny_gvm, tmp_path):
    out = str(tmp_path / "dpo")
    run(["dpo_baseline.py", "--model", tiny_sft, "--data", os.path.join(tiny_gvm, "pairs_train.jsonl"),
         "--eval_data", os.path.join(tiny_gvm, "pairs_eval.jsonl"), "--out_dir", out, "--epochs", "1",
         "--batch_size", "8", "--micro_batch_size", "4", "--eval_prompts", "8", "--max_new_tokens", "8",
         "--log_every", "1", "--lr", "1e-3"])
    s = json.load(open(os.path.join(out, "summary.json")))
    for k in ("eval/pairwise_accuracy", "eval/dpo_loss", "eval/kl_to_ref", "eval/reward_after", "beta"):
        assert k in s
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[0]["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference: margin 0
    assert rows[-1]["train/dpo_loss"] < rows[0]["train/dpo_loss"]
