"""Numeric checks of the pure algorithm functions against docs/algorithm.md §10 (numpy-verified vectors),
loop-vs-vectorized references, and padding invariance."""
import pytest
import torch

import data
import dvpo
import evaluation
import gvm
import model as mdl
import task
import train_utils as tu

T_ = torch.tensor


def close(a, b, atol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=atol)


# ---------------------------------------------------------------- λ-returns and GVM loss (§2)

@pytest.mark.parametrize("lam, expected", [(0.95, [0.885437, 0.91625, 0.975, 1]), (0.0, [0.3, -0.2, 0.5, 1]),
                                           (1.0, [1, 1, 1, 1])])
def test_td_lambda_targets_design_vectors(lam, expected):
    w = T_([[0.1, 0.3, -0.2, 0.5]])
    G = gvm.td_lambda_targets(w, T_([1.0]), torch.ones(1, 4), gamma=1.0, lam=lam)
    assert close(G[0], expected)


def test_td_lambda_targets_negative_reward_and_padding():
    w = T_([[0.0, 0.2, 0.4, 99.0]])  # last entry is padding: must not leak into the targets
    G = gvm.td_lambda_targets(w, T_([-1.0]), T_([[1.0, 1, 1, 0]]), 1.0, 0.95)
    assert close(G[0], [-0.8735, -0.93, -1, 0])


def test_gvm_loss_design_vector():
    w = T_([[0.1, 0.3, -0.2, 0.5], [0.0, 0.2, 0.4, 0.0]])
    mask = T_([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    G = gvm.td_lambda_targets(w, T_([1.0, -1.0]), mask, 1.0, 0.95)
    assert close(gvm.gvm_loss(w, G, mask, mask.sum()), 0.473372)


def td_lambda_reference(w, R, gamma, lam):
    """Plain python recursion for one row (the definition in docs/algorithm.md §2)."""
    G = [0.0] * len(w)
    G[-1] = R
    for k in reversed(range(len(w) - 1)):
        G[k] = gamma * ((1 - lam) * w[k + 1] + lam * G[k + 1])
    return G


def test_td_lambda_loop_vs_vectorized_random_ragged():
    g = torch.Generator().manual_seed(0)
    lens = [1, 3, 7, 5]
    w = torch.randn(4, 7, generator=g)
    R = torch.randn(4, generator=g)
    mask = (torch.arange(7)[None] < T_(lens)[:, None]).float()
    G = gvm.td_lambda_targets(w, R, mask, gamma=0.9, lam=0.7)
    for b, n in enumerate(lens):
        assert close(G[b, :n], td_lambda_reference(w[b, :n].tolist(), R[b].item(), 0.9, 0.7))
        assert (G[b, n:] == 0).all()


def test_td_lambda_monte_carlo_is_discounted_reward():
    w = torch.randn(1, 5)
    G = gvm.td_lambda_targets(w, T_([2.0]), torch.ones(1, 5), gamma=0.5, lam=1.0)
    assert close(G[0], [2 * 0.5 ** (4 - k) for k in range(5)])


def test_value_chain_reads_u_at_P_minus_1_plus_k():
    u = torch.arange(20.0).view(2, 10)
    w, m = mdl.value_chain(u, prompt_len=T_([3, 5]), response_len=T_([4, 2]))
    assert w.shape == (2, 5)
    assert close(w[0], [2, 3, 4, 5, 6]) and close(w[1, :3], [14, 15, 16])
    assert m.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_pairwise_accuracy_counts_ties_half():
    assert evaluation.pairwise_accuracy(T_([1.0, 0.0, 2.0, 1.0]), T_([0.0, 1.0, 2.0, 0.5])) == pytest.approx(0.625)


def test_tau_prefix_truncation():
    ex = [([1, 2, 3, 4], [5, 6, 9]), ([7, 8], [10, 11, 12, 9])]
    assert data.tau_prefix(ex, prompt_len=2, response_len=3) == [3, 4, 5, 6, 9, 7, 8, 10, 11, 12]
    assert data.tau_prefix(ex, prompt_len=0, response_len=2) == [5, 6, 10, 11]  # τ from responses only


# ---------------------------------------------------------------- advantages (§3)

W = T_([[0.1, 0.3, 0.2, 0.6, 0.9]])
KL = T_([[0.1, -0.05, 0.2, 0.0]])


def td_advantages(w, r_kl, mask, gamma, lam):
    """DVPO `td` as dvpo.score computes it: GAE with V_t = w_{t-1} and the terminal score w_T (§4)."""
    return dvpo.gae_with_terminal_reward(w[:, :-1], mdl.terminal(w[:, 1:], mask), r_kl, mask, gamma, lam)


def test_td_advantages_design_vectors():
    mask = torch.ones(1, 4)
    r_kl = -0.2 * KL
    assert close(td_advantages(W, r_kl, mask, 1.0, 0.95)[0], [0.676612, 0.52275, 0.645, 0.3])
    assert close(td_advantages(W, r_kl, mask, 1.0, 1.0)[0], [0.75, 0.57, 0.66, 0.3])
    # δ_t: λ = 0 gives the one-step TD errors
    assert close(td_advantages(W, r_kl, mask, 1.0, 0.0)[0], [0.18, -0.09, 0.36, 0.3])


def test_td_advantages_padding_invariance():
    """Right-padding to length 6 (garbage values in the padding) changes nothing."""
    w = torch.cat([W, T_([[5.0, -7.0]])], 1)  # (1, 7): chain of a T = 6 padded row
    kl = torch.cat([KL, T_([[3.0, 3.0]])], 1)
    mask = T_([[1.0, 1, 1, 1, 0, 0]])
    A = td_advantages(w, -0.2 * kl * mask, mask, 1.0, 0.95)
    assert close(A[0, :4], [0.676612, 0.52275, 0.645, 0.3]) and (A[0, 4:] == 0).all()


def test_td_advantages_sum_of_deltas_is_wT_minus_w0():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 6, generator=g)
    mask = T_([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    A = td_advantages(w, torch.zeros(3, 5), mask, 1.0, 1.0)
    lens = mask.sum(1).long()
    for b in range(3):
        assert close(A[b, 0], w[b, lens[b]] - w[b, 0])


def test_gae_loop_reference():
    g = torch.Generator().manual_seed(2)
    V, r = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    mask = T_([[1.0, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    A = dvpo.gae(V, r, mask, 0.9, 0.8)
    for b, n in enumerate([5, 2]):
        ref, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            v_next = V[b, t + 1].item() if t + 1 < n else 0.0
            last = r[b, t].item() + 0.9 * v_next - V[b, t].item() + 0.9 * 0.8 * last
            ref[t] = last
        assert close(A[b, :n], ref) and (A[b, n:] == 0).all()


def test_batch_norm_paper_mode_vector():
    Q = T_([[0.3, 0.2, 0.6, 0.9]])
    assert close(dvpo.masked_batch_norm(Q, torch.ones(1, 4)), [[-0.730297, -1.095445, 0.365148, 1.460593]])


def test_masked_batch_norm_with_padding_vector():
    Q = T_([[0.2, 0.4, 0.6, 7.0], [-0.3, 0.1, 7.0, 7.0]])
    mask = T_([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    out = dvpo.masked_batch_norm(Q, mask)
    assert close(out, [[0, 0.65938, 1.318761, 0], [-1.648451, -0.32969, 0, 0]])


def test_masked_batch_norm_degenerate():
    assert (dvpo.masked_batch_norm(T_([[3.0, 4.0]]), T_([[1.0, 0.0]])) == 0).all()


def test_paper_advantages_uses_post_token_values():
    """A_t = BN(w_1..w_T)_t + KL-to-go; never w_{t-1}."""
    mask = torch.ones(1, 4)
    r_kl = -0.2 * KL
    A = dvpo.paper_advantages(W, r_kl, mask, 1.0)
    kl_to_go = torch.flip(torch.cumsum(torch.flip(r_kl, [1]), 1), [1])
    assert close(A, T_([[-0.730297, -1.095445, 0.365148, 1.460593]]) + kl_to_go)


# ---------------------------------------------------------------- PPO clip loss (§4)

def test_ppo_clip_loss_design_vector():
    old = T_([[-1, -2, -0.5, -1.5], [-0.7, -1.2, 0, 0]])
    new = T_([[-0.8, -2.3, -0.1, -1.5], [-1.2, -1.0, 0, 0]])
    A = T_([[1, -0.5, 2, 0.3], [-1, 0.8, 5, 5]])
    mask = T_([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    loss, stats = dvpo.ppo_clip_loss(new, old, A, mask, 0.2, n_tokens=mask.sum())
    assert loss.item() == pytest.approx(-0.61, abs=1e-5)
    assert stats["clipfrac"] == pytest.approx(0.833333, abs=1e-5)


def test_ppo_clip_loss_gradient_zero_when_clipped():
    """A > 0 and ratio above 1+ε: the clipped branch is active, so no gradient flows."""
    logp = torch.tensor([[0.5]], requires_grad=True)
    loss, _ = dvpo.ppo_clip_loss(logp, T_([[0.0]]), T_([[1.0]]), T_([[1.0]]), 0.2, 1.0)
    loss.backward()
    assert logp.grad.abs().item() == 0.0


def test_kl_controller_moves_toward_target():
    assert dvpo.kl_controller(0.2, kl=2.0, target=1.0, n_steps=100, horizon=1000) > 0.2
    assert dvpo.kl_controller(0.2, kl=0.5, target=1.0, n_steps=100, horizon=1000) < 0.2


# ---------------------------------------------------------------- PPO baseline pieces (§4)

import ppo_baseline  # noqa: E402
import reward_model  # noqa: E402


def test_bt_loss_hand_vector():
    """-log σ(1) = 0.313262, -log σ(-1) = 1.313262; the loss is their sum over the global pair count."""
    assert close(reward_model.bt_loss(T_([1.0]), T_([0.0]), 1), 0.313262)
    assert close(reward_model.bt_loss(T_([1.0, 0.0]), T_([0.0, 1.0]), 2), (0.313262 + 1.313262) / 2)
    assert close(reward_model.bt_loss(T_([1.0, 0.0]), T_([0.0, 1.0]), 4), (0.313262 + 1.313262) / 4)


def test_ppo_gae_equals_dvpo_td_when_critic_and_rm_are_the_chain():
    """docs/algorithm.md §6: GAE with V_t = w_{t-1} and RM score = w_T reproduces the td vectors."""
    mask = torch.ones(1, 4)
    r_kl = -0.2 * KL
    A = dvpo.gae_with_terminal_reward(W[:, :4], W[:, 4], r_kl, mask, 1.0, 0.95)
    assert close(A[0], [0.676612, 0.52275, 0.645, 0.3])
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 6, generator=g)
    m = T_([[1.0, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    rk = torch.randn(3, 5, generator=g) * m
    score = mdl.terminal(w[:, 1:], m)
    assert close(dvpo.gae_with_terminal_reward(w[:, :5] * m, score, rk, m, 1.0, 0.9), td_advantages(w, rk, m, 1.0, 0.9))


def test_value_loss_clipping():
    old = T_([[0.0, 0.0, 0.0]])
    new = T_([[0.5, -0.1, 0.3]])
    ret = T_([[1.0, 0.0, -1.0]])
    mask = T_([[1.0, 1.0, 0.0]])
    # t=1: unclipped (0.5-1)^2 = .25, clipped (0.2-1)^2 = .64 -> .64; t=2: both .01 -> .01; t=3 masked
    loss = ppo_baseline.value_loss_clipped(new, old, ret, mask, clip=0.2, n_tokens=2.0)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01) / 2)
    # with a huge clip range it is the plain squared error
    loss = ppo_baseline.value_loss_clipped(new, old, ret, mask, clip=100.0, n_tokens=2.0)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.01) / 2)


def test_ppo_baseline_shares_dvpo_hyperparameter_defaults():
    """The comparison is only fair if every hyperparameter the two scripts share has one default."""
    from dataclasses import fields
    d, p = dvpo.Config(), ppo_baseline.Config()
    shared = {f.name for f in fields(d)} & {f.name for f in fields(p)} - {"out_dir"}
    assert {"kl_beta", "lr", "clip_eps", "ppo_epochs", "batch_size", "steps", "lam", "frozen_dtype"} <= shared
    diff = {n: (getattr(d, n), getattr(p, n)) for n in shared if getattr(d, n) != getattr(p, n)}
    assert not diff, diff


def test_masked_batch_norm_large_mean_small_spread():
    """Σx and Σx² are accumulated in fp64 (docs/algorithm.md §3): in fp32, mean 20 and std 1e-3
    cancel catastrophically in Σx²/n - μ² and the output was off by ~3."""
    x = 20 + 1e-3 * torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    ref = (x.double() - x.double().mean()) / x.double().std(unbiased=False)
    out = dvpo.masked_batch_norm(x, torch.ones_like(x))
    assert out.dtype == torch.float32 and (out.double() - ref).abs().max() < 1e-3


# ---------------------------------------------------------------- seeds and held-out splits (train_utils)

def test_seed_for_streams_differ_and_are_stable():
    s = tu.seed_for(0, "rollout", 3, 0)
    assert s == tu.seed_for(0, "rollout", 3, 0)  # a function of its arguments only (resume repeats draws)
    others = {tu.seed_for(1, "rollout", 3, 0), tu.seed_for(0, "rollout", 4, 0), tu.seed_for(0, "rollout", 3, 1),
              tu.seed_for(0, "minibatch", 3, 0)}
    assert s not in others and len(others) == 4 and 0 <= s < 2**63
    a = torch.randperm(32, generator=tu.torch_rng(0, "minibatch", 0, 0))
    b = torch.randperm(32, generator=tu.torch_rng(1, "minibatch", 0, 0))
    assert not torch.equal(a, b)  # --seed changes the minibatch order too


@pytest.mark.parametrize("n, expected_held", [(1, 0), (2, 1), (9, 1), (10, 1), (64, 6)])
def test_split_heldout_small_files(n, expected_held):
    """min(requested, max(1, 10%)) held out, at least one training row, shuffled with the seed."""
    rows = list(range(n))
    train, held = data.split_heldout(rows, 64, 0.1, seed=0, what="prompts")
    assert len(held) == expected_held and len(train) == n - expected_held >= 1
    assert sorted(train + held) == rows
    assert data.split_heldout(rows, 64, 0.1, seed=0, what="prompts") == (train, held)  # deterministic
    assert len(data.split_heldout(rows, 0, 0.1, seed=0, what="prompts")[1]) == 0  # 0 = nothing held out


def test_split_heldout_is_shuffled_by_seed():
    rows = list(range(100))
    _, held0 = data.split_heldout(rows, 10, 0.1, seed=0, what="x")
    _, held1 = data.split_heldout(rows, 10, 0.1, seed=1, what="x")
    assert held0 != rows[:10] and held0 != held1


def test_load_reward_fn(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text("def exact(prompt, response):\n    return float(response == 'ok')\n")
    monkeypatch.chdir(tmp_path)
    fn = evaluation.load_reward_fn("my_reward:exact", builtin=False)
    assert fn("q", "ok") == 1.0 and fn("q", "no") == 0.0
    assert evaluation.load_reward_fn("", builtin=True) is task.gold_reward
    assert evaluation.load_reward_fn("", builtin=False) is None
    for bad in ("my_reward:missing", "no_such_module:f", "my_reward"):
        with pytest.raises(tu.ConfigError, match="--eval_reward"):
            evaluation.load_reward_fn(bad, builtin=False)


# ---------------------------------------------------------------- return-to-go metric (docs/algorithm.md §11)

def test_rtg_metrics_constructed_cases():
    v = T_([1.0, 2.0, 3.0, 4.0])
    exact = evaluation.rtg_metrics(v, 2 * v + 1)  # an affine function of the values: perfect on both counts
    assert exact["corr"] == pytest.approx(1.0) and exact["mse"] == pytest.approx(0.0, abs=1e-12)
    monotone = evaluation.rtg_metrics(v, v ** 3)  # same order, not affine: rank correlation 1, some error left
    assert monotone["corr"] == pytest.approx(1.0) and monotone["mse"] > 0.1
    # by hand: ranks of [2, 1, 4, 3] -> Spearman 1 - 6·4/(4·15) = 0.6; affine fit g = 0.6 v + 1.0 leaves
    # residuals [0.4, -1.2, 1.2, -0.4] -> mse 0.8
    swapped = evaluation.rtg_metrics(v, T_([2.0, 1.0, 4.0, 3.0]))
    assert swapped["corr"] == pytest.approx(0.6) and swapped["mse"] == pytest.approx(0.8)
