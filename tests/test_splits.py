"""What the τ pools and the held-out splits may and may not contain (docs/algorithm.md §8):
  - DVPO's τ: other prompts only, even when the pool is short of them;
  - the GVM's τ: the same policy, another example with another prompt, drawn from both responses of a pair
    alike (never chosen by label), the same τ for both responses of a pair, the labels +1 / -1 in order;
  - held-out prompts (built-in task and files) never among the training prompts; the built-in task's
    preference pairs split by prompt.
(The scripts' own wiring of these pieces, in a real run: tests/test_wiring.py.)"""
import json
import random

import pytest
import torch

import data
import dvpo
import evaluation
import gvm
import task
import train_utils as tu

TOK = task.build_char_tokenizer()


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


GCFG = {"tau_prompt_len": 64, "tau_response_len": 64}  # nothing is cut: τ is the pairs' tokens, in order


def test_dvpo_tau_is_never_from_the_rows_own_prompt():
    """draw_tau_from_pool: K = 1 and K = 2 trajectories of the pool whose prompt differs from the row's, also
    when a prompt repeats in the batch and when fewer than K other prompts are left (drawn with replacement)."""
    pool = [(ids("123:"), ids("1")), (ids("123:"), ids("12")), (ids("45:"), ids("4")), (ids("678:"), ids("6"))]
    prompts = [ids("123:"), ids("45:"), ids("678:"), ids("123:")]
    rng = random.Random(0)
    for _ in range(50):
        for k in (1, 2):
            for p, tau in zip(prompts, dvpo.draw_tau_from_pool(pool, prompts, k, GCFG, rng)):
                allowed = [q + r for q, r in pool if q != p]
                if k == 2:
                    allowed = [a + b for a in allowed for b in allowed]
                assert tau in allowed, (p, tau)
    short = [(ids("123:"), ids("1")), (ids("123:"), ids("2")), (ids("45:"), ids("4"))]  # one other prompt for 123:
    for _ in range(20):
        tau = dvpo.draw_tau_from_pool(short, [ids("123:")], 2, GCFG, rng)[0]
        assert tau == 2 * (ids("45:") + ids("4"))
    assert dvpo.draw_tau_from_pool(pool, prompts, 0, GCFG, rng) == [[]] * 4


def examples_two_policies() -> list[dict]:
    """12 encoded pairs, policies A and B; examples 0 and 1 share a prompt (so do 6 and 7)."""
    out = []
    for i in range(12):
        prompt = ids(f"{20 + i // 2 if i in (0, 1, 6, 7) else i}:")  # "20:" twice, "23:" twice, else unique
        out.append({"prompt": prompt, "chosen": ids(f"c{i}") + [1], "rejected": ids(f"r{i}") + [1],
                    "policy": "A" if i < 6 else "B"})
    return out


def test_gvm_tau_pool_holds_both_responses_of_every_pair():
    """tau_pools: per policy, both responses of every example (so τ cannot be chosen by label), nothing else."""
    ex = examples_two_policies()
    pools = gvm.tau_pools(ex, "preference")
    assert set(pools) == {"A", "B"}
    for name, pool in pools.items():
        want = sorted((i, tuple(e["prompt"]), tuple(e[k])) for i, e in enumerate(ex) if e["policy"] == name
                      for k in ("chosen", "rejected"))
        assert sorted((i, tuple(p), tuple(r)) for i, p, r in pool) == want


def test_gvm_tau_other_prompt_same_policy_label_blind():
    """draw_tau (K = 1): a response of the same policy to another example with another prompt; over many
    draws, chosen and rejected responses alike (label-blind: the share of chosen ones is 1/2)."""
    ex = examples_two_policies()
    assert ex[0]["prompt"] == ex[1]["prompt"] and ex[6]["prompt"] == ex[7]["prompt"]  # the rule has work to do
    pools = gvm.tau_pools(ex, "preference")
    cfg = gvm.Config(tau_k=1, tau_prompt_len=64, tau_response_len=64)
    chosen, n = 0, 0
    for i, e in enumerate(ex):
        allowed = {tuple(f["prompt"] + f[k]): k for j, f in enumerate(ex) for k in ("chosen", "rejected")
                   if j != i and f["prompt"] != e["prompt"] and f["policy"] == e["policy"]}
        for s in range(150):
            tau = gvm.draw_tau(i, e, pools, 1, tu.python_rng(0, "t", i, s), cfg)
            assert tuple(tau) in allowed, (i, tau)
            chosen += allowed[tuple(tau)] == "chosen"
            n += 1
    assert abs(chosen / n - 0.5) < 0.04  # 1800 draws: 0.04 is 3.4 standard deviations


def test_gvm_batch_pairs_share_tau_and_carry_their_labels():
    """make_batch with τ: the two rows of a pair (chosen, then rejected) have the same τ in front of the same
    prompt, and the terminal rewards R_of(e, "chosen"), R_of(e, "rejected")."""
    ex = examples_two_policies()
    cfg = gvm.Config(tau_k=2, tau_prompt_len=2, tau_response_len=2)
    b = gvm.make_batch(ex, [0, 3, 7, 11], "preference", gvm.tau_pools(ex, "preference"), cfg, ("t",), 0,
                       lambda e, k: 1.0 if k == "chosen" else -1.0)
    assert b["R"].tolist() == [1.0, -1.0] * 4
    for j, i in enumerate([0, 3, 7, 11]):
        rows = b["input_ids"][2 * j:2 * j + 2]
        P = b["prompt_len"][2 * j:2 * j + 2].tolist()
        assert P[0] == P[1] == 2 * 4 + len(ex[i]["prompt"])  # K = 2 trajectories of 2 + 2 tokens, then x
        assert torch.equal(rows[0, :P[0]], rows[1, :P[1]])  # the same τ ⊕ x for both responses
        assert rows[0, P[0] - len(ex[i]["prompt"]):P[0]].tolist() == ex[i]["prompt"]
        for r, k in zip(rows, ("chosen", "rejected")):
            assert r[P[0]:P[0] + len(ex[i][k])].tolist() == ex[i][k]


def test_builtin_heldout_prompts_are_never_trained_on():
    """evaluation.load_prompts on the built-in task: the held-out prompts are the task's held-out split
    (the same for every seed), the training prompts never one of them."""
    train, _, held, builtin = evaluation.load_prompts("", TOK, 400, 50, 512, 3, data.TruncationStats())
    assert builtin and len(train) == 400 and len(held) == 50
    assert held == task.builtin_prompts(50, "eval", seed=0)
    assert not set(train) & set(held)
    assert all(task._is_heldout(p) for p in held) and not any(task._is_heldout(p) for p in train)


def test_file_heldout_prompts_are_never_trained_on(tmp_path):
    """A prompts file: the held-out records (min(n_eval, 10%)) are left out of training; together they are
    the file."""
    path = tmp_path / "prompts.jsonl"
    texts = [f"question {i}?" for i in range(40)]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    train, _, held, builtin = evaluation.load_prompts(str(path), TOK, 0, 8, 512, 0, data.TruncationStats())
    assert not builtin and len(held) == 4
    assert not set(train) & set(held) and sorted(train + held) == sorted(texts)


@pytest.fixture(scope="module")
def pair_splits():
    policy = task.build_tiny_model(TOK, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2).eval()
    return task.builtin_pair_splits(policy, TOK, ["T1.0", "T1.5"], 12, 6, 0.1, 0)


def test_builtin_preference_pairs_split_by_prompt(pair_splits):
    """The GVM's (and so the RM's) built-in pairs: no held-out prompt in a training pair; each pair names the
    sampler that wrote it; chosen and rejected differ."""
    train, held = pair_splits["train"], pair_splits["eval"]
    assert train and held
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all(task._is_heldout(r["prompt"]) for r in held) and not any(task._is_heldout(r["prompt"]) for r in train)
    assert {r["policy"] for r in train} == {r["policy"] for r in held} == {"sft@T1.0", "sft@T1.5"}
    assert all(r["chosen"] != r["rejected"] for r in train + held)
