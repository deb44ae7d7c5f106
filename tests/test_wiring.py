"""The scripts' main() wiring, in short real runs (in-process, tiny models), with the calls it makes recorded:
  - dvpo.py and ppo_baseline.py at temperature 0.7 and lr 0: every training rollout samples at 0.7, every
    log-prob (old, reference, training, evaluation) is taken at 0.7, so the KL to the (identical) reference,
    clipfrac and approx_kl are 0 at every step; the per-step and the held-out rewards see each response cut
    at the rollout's stop tokens (the model's generation_config lists the digits, so a reward that counts
    digits must read 0); DVPO's τ are the previous step's rollouts (this step's at step 0) on other prompts.
  - gvm.py with τ: training batches hold training rows only and draw τ from them, evaluation batches hold
    held-out rows only and draw τ from them; labels +1 / -1; the reward model reads the same split.
  - the value model's held-out accuracy travels from gvm.py's summary into its config, and an RL script
    run on a value model at chance says so (the GVM here), on one above chance does not (the RM).
"""
import inspect
import json
import os

import pytest
import torch
from transformers import GenerationConfig

import checkpoint
import data
import dvpo
import grpo_baseline
import gvm
import model as mdl
import ppo_baseline
import reward_model
import task

TOK = task.build_char_tokenizer()
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
DIGITS = TOK.convert_tokens_to_ids(list("0123456789"))
REWARD = "def digits(prompt, response):\n    return float(sum(c.isdigit() for c in response))\n"


def value_model(seed: int):
    vm = mdl.ValueModel(task.build_tiny_model(TOK, seed=seed, **SIZE).model)
    with torch.no_grad():
        vm.value_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return vm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrained tiny policy whose generation_config stops at EOS and at every digit (a plain character:
    the tokenizer alone does not stop there), a GVM (τ: K = 1, nothing cut), a reward model, and the
    digit-counting reward module, all in one folder."""
    d = tmp_path_factory.mktemp("wiring")
    policy = task.build_tiny_model(TOK, seed=0, **SIZE)
    policy.generation_config = GenerationConfig(eos_token_id=[TOK.eos_token_id] + DIGITS,
                                                pad_token_id=TOK.pad_token_id)
    policy.save_pretrained(d / "policy")
    TOK.save_pretrained(d / "policy")
    checkpoint.save_value_model(value_model(2), TOK, str(d / "gvm"), dvpo.GVM_CONFIG,
                                {"tau_k": 1, "tau_prompt_len": 64, "tau_response_len": 64, "value_std": 1.0,
                                 "eval/pairwise_accuracy": 0.5, "eval/pairs": 16})  # at chance: a warning
    checkpoint.save_value_model(value_model(3), TOK, str(d / "rm"), reward_model.RM_CONFIG,
                                {"value_std": 1.0, "eval/pairwise_accuracy": 0.9, "eval/pairs": 100})  # none
    (d / "wiring_reward.py").write_text(REWARD)
    return d


def spy(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that records every call: (arguments by name, defaults filled in; result)."""
    fn, calls = getattr(module, name), []
    sig = inspect.signature(fn)

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        out = fn(*args, **kwargs)
        calls.append((bound.arguments, out))
        return out
    monkeypatch.setattr(module, name, wrapper)
    return calls


RL_ARGS = dict(steps=2, batch_size=8, minibatch_size=4, micro_batch_size=2, ppo_epochs=1, lr=0.0, warmup_steps=1,
               temperature=0.7, max_new_tokens=8, eval_prompts=4, eval_batch_size=4,
               eval_reward="wiring_reward:digits", save_every=0)


def check_rl_run(out: str, summary: dict, rollouts: list, logps: list):
    """The checks both RL scripts share (see the module docstring)."""
    assert {a["temperature"] for a, _ in logps} == {0.7}  # old, reference, training and evaluation log-probs
    train = [(a, b) for a, b in rollouts if len(a["prompt_ids"]) == RL_ARGS["batch_size"]]
    held = [(a, b) for a, b in rollouts if len(a["prompt_ids"]) == RL_ARGS["eval_prompts"]]
    assert len(train) == RL_ARGS["steps"] and len(train) + len(held) == len(rollouts)
    assert {a["temperature"] for a, _ in train} == {0.7}
    assert sorted(a["temperature"] for a, _ in held) == [0.0, 0.0, 0.7, 0.7]  # sampled and greedy, before and after
    for group in (train, held):  # some responses stopped at a digit: the reward check below is not vacuous
        assert any(r[-1] in DIGITS for _, b in group for r in mdl.responses(b) if r)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == RL_ARGS["steps"]
    for r in rows:
        assert r["kl"] == 0.0 and r["clipfrac"] == 0.0 and r["approx_kl"] < 1e-12, r
        assert r["reward"] == 0.0, r  # no digit survives decoding at the rollout's stop tokens
    assert summary["eval/reward_before"] == summary["eval/reward_after"] == 0.0


def test_dvpo_main_temperature_stop_tokens_and_tau(setup, monkeypatch, tmp_path, capsys):
    rollouts, logps = spy(monkeypatch, mdl, "rollout"), spy(monkeypatch, mdl, "response_logprobs")
    chains = spy(monkeypatch, dvpo, "gvm_values")
    monkeypatch.chdir(setup)  # --eval_reward imports its module from the working directory
    out = str(tmp_path / "dvpo")
    summary = dvpo.main(dvpo.Config(model=str(setup / "policy"), gvm=str(setup / "gvm"), out_dir=out, **RL_ARGS))
    check_rl_run(out, summary, rollouts, logps)
    assert f"warning: {setup / 'gvm'} ranked its 16 held-out pairs with accuracy 0.500" in capsys.readouterr().out
    assert summary["tau_k"] == 1 and len(chains) == RL_ARGS["steps"]
    pairs = [list(zip(a["batch"]["prompt_ids"], mdl.responses(a["batch"]))) for a, _ in chains]
    assert {tuple(p) for p, _ in pairs[0]} != {tuple(p) for p, _ in pairs[1]}  # the steps' prompts differ
    for step, (a, _) in enumerate(chains):
        source = pairs[max(step - 1, 0)]  # the previous step's rollouts; at step 0 this step's
        for p, tau in zip(a["batch"]["prompt_ids"], a["tau"]):
            assert tau in [q + r for q, r in source if q != p], (step, p, tau)


def test_ppo_main_temperature_and_stop_tokens(setup, monkeypatch, tmp_path, capsys):
    rollouts, logps = spy(monkeypatch, mdl, "rollout"), spy(monkeypatch, mdl, "response_logprobs")
    monkeypatch.chdir(setup)
    out = str(tmp_path / "ppo")
    summary = ppo_baseline.main(ppo_baseline.Config(model=str(setup / "policy"), reward="rm:" + str(setup / "rm"),
                                                    out_dir=out, critic_lr=0.0, **RL_ARGS))
    check_rl_run(out, summary, rollouts, logps)
    assert "chance" not in capsys.readouterr().out  # the RM is above chance


def test_grpo_main_groups_temperature_and_stop_tokens(setup, monkeypatch, tmp_path, capsys):
    """grpo_baseline.py: the same checks, and every training rollout holds batch_size / n prompts, each
    repeated in n consecutive rows (the group that group_advantages reads), a different prompt per group.
    Scored by the GVM's w_T (at chance: a warning)."""
    rollouts, logps = spy(monkeypatch, mdl, "rollout"), spy(monkeypatch, mdl, "response_logprobs")
    monkeypatch.chdir(setup)
    out, n = str(tmp_path / "grpo"), 4
    summary = grpo_baseline.main(grpo_baseline.Config(model=str(setup / "policy"), reward="gvm:" + str(setup / "gvm"),
                                                      out_dir=out, group_size=n, estimator="grpo", **RL_ARGS))
    check_rl_run(out, summary, rollouts, logps)
    assert f"warning: {setup / 'gvm'} ranked its 16 held-out pairs" in capsys.readouterr().out
    for a, _ in rollouts:
        p = a["prompt_ids"]
        if len(p) == RL_ARGS["batch_size"]:
            groups = [p[g:g + n] for g in range(0, len(p), n)]
            assert all(x == g[0] for g in groups for x in g), p
            assert len({tuple(g[0]) for g in groups}) == len(groups), p


def write_pairs(path, n: int):
    """n preference records, policies A and B, every prompt distinct."""
    path.write_text("".join(json.dumps({"prompt": f"{i}{i % 7}:", "chosen": f"c{i}", "rejected": f"r{i}x",
                                        "policy": "AB"[i % 2]}) + "\n" for i in range(n)))
    return str(path)


def encoded(rows: list) -> set:
    """(prompt ids, response ids) of both responses of every record, as the GVM encodes them."""
    return {(tuple(data.encode_prompt(TOK, r["prompt"])), tuple(data.encode_response(TOK, r[k])))
            for r in rows for k in ("chosen", "rejected")}


def test_gvm_main_tau_and_labels_stay_within_their_split(setup, monkeypatch, tmp_path):
    """gvm.py on a file (τ: K = 1): every training batch holds training rows, with τ from training rows of the
    same policy and another prompt; every evaluation batch holds held-out rows, with τ from held-out rows;
    R = +1 (chosen), -1 (rejected). The pairs it writes are its split, and the reward model reads that split,
    from the GVM's files (its default) or from the same file."""
    batches = spy(monkeypatch, gvm, "make_batch")
    monkeypatch.chdir(tmp_path)
    path = write_pairs(tmp_path / "pairs.jsonl", 40)
    gvm.main(gvm.Config(model=str(setup / "policy"), data=path, eval_frac=0.2, out_dir="out/gvm", tau_k=1,
                        tau_prompt_len=64, tau_response_len=64, epochs=1, batch_size=8, micro_batch_size=4,
                        lr=1e-3, warmup_steps=1, log_every=1))
    rows = {s: [json.loads(line) for line in open(f"out/gvm/pairs_{s}.jsonl")] for s in ("train", "eval")}
    assert len(rows["train"]) == 32 and len(rows["eval"]) == 8
    split = {"gvm/tau": encoded(rows["train"]), "gvm/eval_tau": encoded(rows["eval"])}
    assert not split["gvm/tau"] & split["gvm/eval_tau"]
    seen = set()
    for a, b in batches:
        kind = a["tau_key"][0]
        allowed, ex = split[kind], a["examples"]
        seen.add(kind)
        assert {(tuple(e["prompt"]), tuple(e[k])) for e in ex for k in ("chosen", "rejected")} == allowed
        assert all((tuple(p), tuple(r)) in allowed for pool in a["pools"].values() for _, p, r in pool), kind
        assert b["R"].tolist() == [1.0, -1.0] * len(a["idx"])
        for j, i in enumerate(a["idx"]):
            for row in (2 * j, 2 * j + 1):
                tau = b["input_ids"][row, :int(b["prompt_len"][row]) - len(ex[i]["prompt"])].tolist()
                assert tau in [list(p) + list(r) for p, r in allowed if list(p) != ex[i]["prompt"] and
                               any(e["prompt"] == list(p) and e["policy"] == ex[i]["policy"] for e in ex)], (kind, i)
    assert seen == {"gvm/tau", "gvm/eval_tau"}
    gcfg, summary = (json.load(open(f"out/gvm/{f}")) for f in (dvpo.GVM_CONFIG, "summary.json"))
    assert (gcfg["eval/pairwise_accuracy"], gcfg["eval/pairs"]) == (summary["eval/pairwise_accuracy"], 8)
    for cfg in (reward_model.Config(), reward_model.Config(data=path, eval_frac=0.2)):
        train, held = data.load_pairs(cfg.data, cfg.eval_data, cfg.skip_bad, cfg.eval_frac, cfg.seed)
        assert (train, held) == (rows["train"], rows["eval"])
