"""Small files: sft.py, gvm.py, reward_model.py, dvpo.py and ppo_baseline.py on files of 1, 2, 9, 10 and
64 records either train or stop with one clear line (sys.exit / DataError / ConfigError, as the scripts'
__main__ prints them, prefixed with the script's name; any other exception fails the test), and
--eval_prompts 0 skips the held-out evaluation. Held-out splits follow data.split_heldout:
min(requested, 10%), at least one, never all."""
import json
import os
import subprocess
import sys

import pytest

import data
import dvpo
import gvm
import ppo_baseline
import reward_model
import sft
import task
import train_utils as tu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [1, 2, 9, 10, 64]


def outcome(module, cfg):
    """("trained", summary) or ("stopped", the one line a user sees)."""
    try:
        return "trained", module.main(cfg)
    except SystemExit as e:
        return "stopped", str(e.code)
    except (data.DataError, tu.ConfigError) as e:  # __main__ prints "<script>.py: <message>"
        return "stopped", f"{module.__name__}.py: {e}"


def stopped(result, *words):
    kind, msg = result
    assert kind == "stopped", result
    assert "\n" not in msg and all(w in msg for w in words), msg


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def sft_recs(n):
    return [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(n)]


def pair_recs(n):
    return [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": f"{i}{i}"} for i in range(n)]


def prompt_recs(n):
    return [{"prompt": f"{i}+{i}="} for i in range(n)]


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sft"))
    tok = task.build_char_tokenizer()
    task.build_tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_gvm(tiny_sft, tmp_path_factory):
    d = tmp_path_factory.mktemp("gvm")
    out = str(d / "gvm")
    kind, s = outcome(gvm, gvm.Config(model=tiny_sft, data=write(d / "p.jsonl", pair_recs(64)), out_dir=out,
                                      batch_size=8, epochs=1, device="cpu"))
    assert kind == "trained" and s["train/pairs"] == 61 and s["eval/pairs"] == 3  # 5% of 64 held out
    return out


@pytest.mark.parametrize("n", SIZES)
def test_sft_small_files_train(tmp_path, n):
    cfg = sft.Config(data=write(tmp_path / "sft.jsonl", sft_recs(n)), out_dir=str(tmp_path / "o"), steps=2,
                     batch_size=4, log_every=1, device="cpu")
    kind, s = outcome(sft, cfg)
    assert kind == "trained", s
    assert s["train/steps"] == 2 and os.path.exists(tmp_path / "o" / "model.safetensors")
    held = {1: 0, 2: 1, 9: 1, 10: 1, 64: 6}[n]  # min(--eval_size 64, max(1, 10%)), never all rows
    assert ("eval/nll" in s) == (held > 0)


@pytest.mark.parametrize("n", SIZES)
def test_gvm_small_files_train_or_say_why(tiny_sft, tmp_path, n):
    cfg = gvm.Config(model=tiny_sft, data=write(tmp_path / "p.jsonl", pair_recs(n)), out_dir=str(tmp_path / "g"),
                     batch_size=4, epochs=1, device="cpu")
    os.makedirs(cfg.out_dir)
    result = outcome(gvm, cfg)
    if n == 1:
        stopped(result, "gvm.py:", "need training and held-out rows", "--eval_data")
    elif n == 2:
        stopped(result, "gvm.py:", "1 training rows is fewer than one batch of 4")
    else:
        assert result[0] == "trained" and result[1]["eval/pairs"] >= 1, result


@pytest.mark.parametrize("n", SIZES)
def test_dvpo_small_prompt_files_train(tiny_sft, tiny_gvm, tmp_path, n):
    cfg = dvpo.Config(model=tiny_sft, gvm=tiny_gvm, prompts=write(tmp_path / "q.jsonl", prompt_recs(n)),
                      out_dir=str(tmp_path / "d"), steps=2, batch_size=4, minibatch_size=4, micro_batch_size=4,
                      ppo_epochs=1, max_new_tokens=4, eval_prompts=4, device="cpu")
    kind, s = outcome(dvpo, cfg)
    assert kind == "trained" and s["train/steps"] == 2, s
    assert ("eval/kl_to_ref" in s) == (n > 1)  # one prompt: all of it trains, nothing is held out


@pytest.mark.parametrize("n", SIZES)
def test_reward_model_and_ppo_baseline_small_files_train_or_say_why(tiny_sft, tmp_path, n):
    rm_cfg = reward_model.Config(model=tiny_sft, data=write(tmp_path / "p.jsonl", pair_recs(n)),
                                 out_dir=str(tmp_path / "rm"), batch_size=4, epochs=1, device="cpu")
    result = outcome(reward_model, rm_cfg)
    if n == 1:
        stopped(result, "reward_model.py:", "1 pair(s)", "at least 2 are needed", "--eval_data")
        return
    if n == 2:
        stopped(result, "reward_model.py:", "1 training pairs is fewer than one batch of 4", "--batch_size")
        return
    assert result[0] == "trained", result
    cfg = ppo_baseline.Config(model=tiny_sft, reward="rm:" + rm_cfg.out_dir,
                              prompts=write(tmp_path / "q.jsonl", prompt_recs(n)),
                              out_dir=str(tmp_path / "p"), steps=2, batch_size=4, minibatch_size=4,
                              micro_batch_size=4, ppo_epochs=1, max_new_tokens=4, eval_prompts=4, device="cpu")
    result = outcome(ppo_baseline, cfg)
    assert result[0] == "trained" and result[1]["train/steps"] == 2, result


def test_eval_prompts_0_skips_evaluation(tiny_sft, tiny_gvm, tmp_path, capsys):
    q = write(tmp_path / "q.jsonl", prompt_recs(10))
    common = dict(model=tiny_sft, prompts=q, steps=1, batch_size=4, minibatch_size=4, micro_batch_size=4,
                  ppo_epochs=1, max_new_tokens=4, eval_prompts=0, device="cpu")
    kind, s = outcome(dvpo, dvpo.Config(gvm=tiny_gvm, out_dir=str(tmp_path / "d"), **common))
    assert kind == "trained" and not any(k.startswith("eval/") for k in s), s
    out = capsys.readouterr().out
    assert "10 training prompts, 0 held out (no held-out evaluation)" in out and "no held-out prompts" in out
    rm_dir = str(tmp_path / "rm")
    kind, _ = outcome(reward_model, reward_model.Config(model=tiny_sft, data=write(tmp_path / "p.jsonl", pair_recs(10)),
                                                        batch_size=4, epochs=1, out_dir=rm_dir, device="cpu"))
    assert kind == "trained"
    kind, s = outcome(ppo_baseline, ppo_baseline.Config(reward="rm:" + rm_dir, out_dir=str(tmp_path / "p"), **common))
    assert kind == "trained" and not any(k.startswith("eval/") for k in s), s


def test_too_few_rows_for_the_processes_is_one_line(tmp_path):
    """torchrun with 2 processes and 1 training example (the other is held out): every rank would
    need a row, so sft.py stops before training with one line and no traceback from the repo."""
    path = write(tmp_path / "sft.jsonl", sft_recs(2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "sft.py", "--data", path, "--out_dir", str(tmp_path / "o"), "--steps", "1", "--batch_size", "2"]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    assert "sft.py: 1 training example(s) for 2 processes; every process needs at least one" in p.stderr
    assert 'sft.py", line' not in p.stderr and "data.py\", line" not in p.stderr  # no traceback through our code
