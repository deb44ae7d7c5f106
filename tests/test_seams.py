"""Tests at the seams: each script's step, where the pure functions of docs/algorithm.md are wired together,
checked against an independent plain-loop computation written here from the docs (one unpadded row at a
time, no helper of the repository) on tiny hand-built rollouts.

  - DVPO (`dvpo.score` then `dvpo.update`), PPO (`ppo_baseline.score` / `update`) and GRPO / RLOO / ReMax
    (`grpo_baseline.score` / `update`): the log-probs, the KL
    penalty as a reward (its sign and direction), the advantages (`td`, `paper`; PPO's GAE with the critic and
    returns from the raw advantages), the clipped policy and value losses of every minibatch (signs, global
    token means over the minibatch) and their gradients, at temperature 1 and 0.7;
  - a step at lr 0 at temperature 0.7: ratio 1, clipfrac 0, approx_kl 0, KL 0 to an identical reference;
  - the read positions of docs/algorithm.md §1 on a hand-made chain (a value model that returns the value of
    the token at each position, so a read one position off returns another token's value);
  - one GVM step's gradient against the semi-gradient of TD(λ) (targets detached, §2), one reward-model step's
    against the Bradley-Terry gradient (§6), one DPO step's against the DPO gradient (§12);
  - the evaluation's undefined standard error with one prompt, and rewards decoded at the rollout's stop tokens.
The gradients are read off an SGD optimizer at lr 0 (the weights stay put, so every minibatch of the step
is computed at the same weights) whose step pre-hook records them; clipping is off (grad_clip 1e9).
"""
import copy
import math

import pytest
import torch

import data
import dpo_baseline
import dvpo
import evaluation
import grpo_baseline
import gvm
import model as mdl
import ppo_baseline
import reward_model
import task
import train_utils as tu

TOK = task.build_char_tokenizer()
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
BETA, SCALE, GAMMA, LAM = 0.3, 2.5, 0.9, 0.8  # γ, λ ≠ 1: a misplaced discount shows


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


# 8 rows: prompts of different lengths (left padding), responses of different lengths, one truncated (no EOS)
PROMPTS = [ids(p) for p in ("52817:", "903:", "4412:", "7:", "61:", "283:", "90210:", "55:")]
RESPONSES = [ids(r) + e for r, e in (("12578", [EOS]), ("039", [EOS]), ("1244x12", []), ("7", [EOS]),
                                     ("16", [EOS]), ("2838", [EOS]), ("01229", [EOS]), ("5", [EOS]))]
TAU = [PROMPTS[(b + 3) % 8][-3:] + RESPONSES[(b + 3) % 8][:4] for b in range(8)]  # τ prefixes of other rows


def lm(seed: int):
    return task.build_tiny_model(TOK, seed=seed, **SIZE)


def value_model(seed: int):
    """A ValueModel on a tiny backbone with a random head, so that its values differ along a row."""
    vm = mdl.ValueModel(lm(seed).model)
    with torch.no_grad():
        vm.value_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
        vm.value_head.bias.fill_(0.3)
    return vm


def perturbed(module, std: float, seed: int, only: str = ""):
    """A copy with Gaussian noise on the parameters whose name contains `only`: a policy (critic) one
    update away from the rollout's, so that ratios (values) move past the clip range on some tokens."""
    m = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if only in n:
                p.add_(std * torch.randn(p.shape, generator=g))
    return m


def rollout_batch(prompts: list, responses: list) -> dict:
    """The rollout layout by hand: prompts left-padded to P, responses right-padded to T."""
    P, T = max(map(len, prompts)), max(map(len, responses))
    rows = [[PAD] * (P - len(p)) + p + r + [PAD] * (T - len(r)) for p, r in zip(prompts, responses)]
    attn = [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (T - len(r)) for p, r in zip(prompts, responses)]
    B = len(prompts)
    return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(attn), "prompt_len": torch.full((B,), P),
            "response_len": torch.tensor([len(r) for r in responses]),
            "truncated": torch.tensor([r[-1] != EOS for r in responses]),
            "response": torch.tensor([r + [PAD] * (T - len(r)) for r in responses]), "prompt_ids": prompts}


@pytest.fixture(scope="module")
def models():
    old = lm(0)
    return {"old": old, "new": perturbed(old, 0.05, 10, only="lm_head"), "ref": lm(1).eval(),
            "gvm": value_model(2).eval(), "rm": value_model(3).eval(), "critic": value_model(4),
            "batch": rollout_batch(PROMPTS, RESPONSES)}


# ----------------------------------------------------------------------------------------------
# The plain-loop reference: one unpadded row at a time, from docs/algorithm.md

def logprobs_alone(policy, prompt, response, temperature):
    """log π(y_t | s_t) and the entropy of π(· | s_t), t = 1..T, from one forward of the unpadded row x ⊕ y:
    the logits at position P+t-2 score y_t (docs/algorithm.md §1), divided by the temperature."""
    logits = policy(input_ids=torch.tensor([prompt + response])).logits[0].float()
    P = len(prompt)
    lp = [torch.log_softmax(logits[P + t - 2] / temperature, -1) for t in range(1, len(response) + 1)]
    return (torch.stack([x[y] for x, y in zip(lp, response)]),
            torch.stack([-(x.exp() * x).sum() for x in lp]).detach())


def chain_alone(value_model, prefix, prompt, response):
    """The value chain w_k = u_{P-1+k}, k = 0..T, of the unpadded row [τ] ⊕ x ⊕ y (P counts τ): (T+1,)."""
    z = prefix + prompt + response
    u = value_model(torch.tensor([z]), torch.ones(1, len(z), dtype=torch.long))[0]
    P = len(prefix) + len(prompt)
    return u[P - 1:P + len(response)]


def whiten(rows: list) -> list:
    """(x - μ) / (σ + 1e-8) with the population μ, σ of every entry of every row (§3)."""
    flat = [x for r in rows for x in r]
    mu = sum(flat) / len(flat)
    sd = math.sqrt(sum((x - mu) ** 2 for x in flat) / len(flat))
    return [[(x - mu) / (sd + 1e-8) for x in r] for r in rows]


def gae_sum(V: list, r: list, gamma: float, lam: float) -> list:
    """A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} - V_t with V_{T+1} = 0: the definition, as a sum."""
    T = len(r)
    delta = [r[t] + gamma * (V[t + 1] if t + 1 < T else 0.0) - V[t] for t in range(T)]
    return [sum((gamma * lam) ** k * delta[t + k] for k in range(T - t)) for t in range(T)]


def dvpo_advantages(w: list, kl: list, mode: str) -> list:
    """docs/algorithm.md §4 on chains w (T_b+1 each) and k1 KL (T_b each), r^KL = -β kl."""
    r_kl = [[-BETA * k for k in row] for row in kl]
    if mode == "td":  # V_t = w_{t-1}, r_t = r^KL_t + [t = T] w_T, GAE, whitened
        return whiten([gae_sum(c[:-1], [x + (c[-1] if t == len(rk) - 1 else 0.0) for t, x in enumerate(rk)], GAMMA,
                               LAM) for c, rk in zip(w, r_kl)])
    Q = whiten([c[1:] for c in w])  # paper: BN(Q)_t with Q_t = w_t, plus the KL reward-to-go
    return [[q + sum(GAMMA ** (k - t) * rk[k] for k in range(t, len(rk))) for t, q in enumerate(qr)]
            for qr, rk in zip(Q, r_kl)]


def clipped_policy_loss(new_lp, old_lp, adv, eps):
    """Σ max(-A ρ, -A clip(ρ, 1-ε, 1+ε)) / (valid tokens of the minibatch), rows as lists (§5)."""
    terms = []
    for n, o, a in zip(new_lp, old_lp, adv):
        ratio = torch.exp(n - o)
        a = torch.tensor(a)
        terms.append(torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps)))
    return torch.cat(terms).sum() / sum(len(t) for t in terms)


def recording_sgd(module):
    """SGD whose lr the step sets to cfg.lr = 0: the weights stay put; each optimizer step's gradients
    (after clipping) are appended to .grads."""
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    opt.grads = []
    opt.register_step_pre_hook(lambda o, args, kwargs: o.grads.append(
        [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]))
    return opt


def assert_grads_close(got: list, want: list, what: str):
    """All gradients as one vector: the largest error within 1e-4 of the largest entry."""
    g, w = torch.cat([x.flatten() for x in got]), torch.cat([x.flatten() for x in want])
    scale = w.abs().max()
    assert scale > 0 and (g - w).abs().max() <= 1e-4 * scale, (what, (g - w).abs().max().item(), scale.item())


def assert_rows(got: torch.Tensor, rows: list, what: str, atol: float = 2e-5, zero_padding: bool = True):
    """A response-aligned tensor equals per-row lists on the valid entries (and is 0 on padding)."""
    for b, r in enumerate(rows):
        torch.testing.assert_close(got[b, :len(r)], torch.as_tensor(r, dtype=got.dtype), atol=atol, rtol=1e-4,
                                   msg=f"{what}, row {b}")
        assert not zero_padding or (got[b, len(r):] == 0).all(), f"{what}, row {b}: non-zero on padding"


def minibatches(cfg, B: int):
    """(optimizer step k, the rows of its minibatch), in the order update() draws them on one process: the
    stream (seed, "minibatch", step 0, epoch)."""
    k = 0
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=tu.torch_rng(cfg.seed, "minibatch", 0, epoch))
        for mb in range(0, B, cfg.minibatch_size):
            yield k, perm[mb:mb + cfg.minibatch_size].tolist()
            k += 1


def check_policy_updates(policy, cfg, stats, opt, old_lp, adv, temperature):
    """Every minibatch's logged loss and gradient, and every micro-batch's clipfrac, approx_kl and entropy,
    against the plain loop; returns the share of clipped tokens (the test must exercise both branches)."""
    params = list(policy.parameters())
    clipped = []
    for k, rows in minibatches(cfg, len(PROMPTS)):
        new = [logprobs_alone(policy, PROMPTS[b], RESPONSES[b], temperature) for b in rows]
        loss = clipped_policy_loss([n for n, _ in new], [old_lp[b] for b in rows], [adv[b] for b in rows],
                                   cfg.clip_eps)
        assert stats["policy_loss"][k].item() == pytest.approx(loss.item(), rel=1e-4, abs=1e-6), k
        assert_grads_close(opt.grads[k], torch.autograd.grad(loss, params), f"policy, optimizer step {k}")
        for i in range(0, len(rows), cfg.micro_batch_size):
            j = k * (len(rows) // cfg.micro_batch_size) + i // cfg.micro_batch_size
            part = list(range(i, i + cfg.micro_batch_size))
            logratio = torch.cat([new[p][0].detach() - old_lp[rows[p]] for p in part])
            out = ((logratio.exp() - 1).abs() > cfg.clip_eps).float()
            clipped.append(out)
            assert stats["clipfrac"][j].item() == pytest.approx(out.mean().item(), abs=1e-6)
            assert stats["approx_kl"][j].item() == pytest.approx((0.5 * logratio ** 2).mean().item(), rel=1e-3,
                                                                 abs=1e-8)
            entropy = torch.cat([new[p][1] for p in part]).mean()
            assert stats["entropy"][j].item() == pytest.approx(entropy.item(), rel=1e-4)
    return torch.cat(clipped).mean().item()


# ----------------------------------------------------------------------------------------------
# DVPO and PPO steps

@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("advantage", ["td", "paper"])
def test_dvpo_step_matches_the_plain_loop(models, advantage, temperature):
    """dvpo.score on a hand-built rollout with τ prefixes: log-probs at the temperature, k1 KL of π_old
    against π_ref, the GVM chain on [τ] ⊕ x ⊕ y divided by the scale, and the advantages of §4; then
    dvpo.update with 2 epochs × 2 minibatches × 2 micro-batches: each minibatch's loss and gradient is the
    clipped objective's global token mean over that minibatch (§5)."""
    cfg = dvpo.Config(batch_size=8, minibatch_size=4, micro_batch_size=2, ppo_epochs=2, lr=0.0, grad_clip=1e9,
                      advantage=advantage, gamma=GAMMA, lam=LAM, temperature=temperature)
    sc = dvpo.score(models["old"], models["ref"], models["gvm"], models["batch"], TAU, BETA, SCALE, cfg, PAD, "cpu")
    with torch.no_grad():
        old_lp = [logprobs_alone(models["old"], p, r, temperature)[0] for p, r in zip(PROMPTS, RESPONSES)]
        ref_lp = [logprobs_alone(models["ref"], p, r, temperature)[0] for p, r in zip(PROMPTS, RESPONSES)]
        w = [(chain_alone(models["gvm"], t, p, r) / SCALE).tolist() for t, p, r in zip(TAU, PROMPTS, RESPONSES)]
    kl = [(o - f).tolist() for o, f in zip(old_lp, ref_lp)]
    adv = dvpo_advantages(w, kl, advantage)
    assert_rows(sc["old_logp"], [x.tolist() for x in old_lp], "old log-probs", zero_padding=False)
    assert_rows(sc["kl"], kl, "kl")
    assert max(abs(x) for row in kl for x in row) > 0.1  # the KL term is not negligible here
    for b, c in enumerate(w):
        torch.testing.assert_close(sc["w"][b, :len(c)], torch.tensor(c), atol=2e-5, rtol=1e-4, msg=f"chain {b}")
    assert_rows(sc["adv"], adv, "advantages", atol=1e-4)

    opt = recording_sgd(models["new"])
    stats, n_steps = dvpo.update(models["new"], opt, models["batch"], sc, cfg, 0, 0)
    assert n_steps == len(opt.grads) == 4
    clipfrac = check_policy_updates(models["new"], cfg, stats, opt, old_lp, adv, temperature)
    assert 0.05 < clipfrac < 0.95  # both branches of the clipped objective occur


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ppo_step_matches_the_plain_loop(models, temperature):
    """ppo_baseline.score: the RM score at the last response token divided by the scale, the critic's
    V_t = w_{t-1} (position P+t-2), GAE with r_t = r^KL_t + [t = T] score, returns from the raw advantages,
    whitened advantages (§6); then update: the policy's clipped loss and the critic's clipped value loss
    ½ max((V - R)², (V_old + clip(V - V_old, ±c) - R)²), each a global token mean per minibatch, and both
    gradients."""
    cfg = ppo_baseline.Config(batch_size=8, minibatch_size=4, micro_batch_size=2, ppo_epochs=2, lr=0.0,
                              critic_lr=0.0, grad_clip=1e9, gamma=GAMMA, lam=LAM, temperature=temperature)
    critic = models["critic"]
    sc = ppo_baseline.score(models["old"], models["ref"], models["rm"], critic, models["batch"], BETA, SCALE, cfg,
                            "cpu")
    with torch.no_grad():
        old_lp = [logprobs_alone(models["old"], p, r, temperature)[0] for p, r in zip(PROMPTS, RESPONSES)]
        ref_lp = [logprobs_alone(models["ref"], p, r, temperature)[0] for p, r in zip(PROMPTS, RESPONSES)]
        score = [chain_alone(models["rm"], [], p, r)[-1].item() / SCALE for p, r in zip(PROMPTS, RESPONSES)]
        V = [chain_alone(critic, [], p, r)[:-1].tolist() for p, r in zip(PROMPTS, RESPONSES)]  # V_t = w_{t-1}
    kl = [(o - f).tolist() for o, f in zip(old_lp, ref_lp)]
    raw = [gae_sum(v, [-BETA * k + (s if t == len(kr) - 1 else 0.0) for t, k in enumerate(kr)], GAMMA, LAM)
           for v, kr, s in zip(V, kl, score)]
    returns = [[a + v for a, v in zip(ar, vr)] for ar, vr in zip(raw, V)]  # R_t = A_t + V_t, A before whitening
    adv = whiten(raw)
    torch.testing.assert_close(sc["score"], torch.tensor(score), atol=2e-5, rtol=1e-4)
    assert_rows(sc["kl"], kl, "kl")
    assert_rows(sc["old_values"], V, "critic values")
    assert_rows(sc["returns"], returns, "returns")
    assert_rows(sc["adv"], adv, "advantages", atol=1e-4)

    new_critic = perturbed(critic, 0.1, 11, only="value_head")
    opt, critic_opt = recording_sgd(models["new"]), recording_sgd(new_critic)
    stats, n_steps = ppo_baseline.update(models["new"], new_critic, opt, critic_opt, models["batch"], sc, cfg, 0, 0)
    assert n_steps == len(opt.grads) == len(critic_opt.grads) == 4
    clipfrac = check_policy_updates(models["new"], cfg, stats, opt, old_lp, adv, temperature)
    assert 0.05 < clipfrac < 0.95
    params, branches = list(new_critic.parameters()), []
    for k, rows in minibatches(cfg, len(PROMPTS)):
        terms = []
        for b in rows:
            v = chain_alone(new_critic, [], PROMPTS[b], RESPONSES[b])[:-1]
            v_old, R = torch.tensor(V[b]), torch.tensor(returns[b])
            unclipped, clipped = (v - R) ** 2, (v_old + (v - v_old).clamp(-cfg.value_clip, cfg.value_clip) - R) ** 2
            terms.append(0.5 * torch.maximum(unclipped, clipped))
            branches.append((clipped > unclipped + 1e-6).float())
        vloss = torch.cat(terms).sum() / sum(len(t) for t in terms)
        assert stats["value_loss"][k].item() == pytest.approx(vloss.item(), rel=1e-4), k
        assert_grads_close(critic_opt.grads[k], torch.autograd.grad(vloss, params), f"critic, optimizer step {k}")
    assert 0.05 < torch.cat(branches).mean().item() < 0.95  # both branches of the clipped value loss occur


def group_baseline(s: list, n: int, estimator: str, greedy: list) -> list:
    """Â per row from the definitions (§12): groups of n consecutive rows; greedy: remax's baseline per group."""
    out = []
    for g in range(0, len(s), n):
        x = s[g:g + n]
        mu = sum(x) / n
        if estimator == "grpo":  # sample std (Bessel), as TRL and verl compute it
            sd = math.sqrt(sum((v - mu) ** 2 for v in x) / (n - 1))
            out += [(v - mu) / (sd + 1e-8) for v in x]
        elif estimator == "rloo":  # the mean of the other n - 1
            out += [v - (sum(x) - v) / (n - 1) for v in x]
        else:  # remax
            out += [v - greedy[g // n] for v in x]
    return out


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "remax"])
def test_grpo_step_matches_the_plain_loop(models, estimator):
    """grpo_baseline.score on 2 groups of 4 rows: the scorer read at each response's last token divided by
    the scale, the group baseline, and per-token A_t = γ^(T-t) Â + Σ_{k≥t} γ^(k-t) r^KL_k with no whitening;
    then update: each minibatch's clipped loss (global token mean) and gradient, at temperature 0.7."""
    n, temperature = 4, 0.7
    cfg = grpo_baseline.Config(batch_size=8, minibatch_size=4, micro_batch_size=2, ppo_epochs=2, lr=0.0,
                               grad_clip=1e9, gamma=GAMMA, temperature=temperature, group_size=n, estimator=estimator)
    greedy_rows = (PROMPTS[0::n], RESPONSES[1::n])  # stand-ins for each group's greedy response
    baseline_batch = rollout_batch(*greedy_rows) if estimator == "remax" else None
    sc = grpo_baseline.score(models["old"], models["ref"], models["rm"], models["batch"], baseline_batch, BETA, SCALE,
                             cfg, "cpu")
    with torch.no_grad():
        old_lp = [logprobs_alone(models["old"], p, r, temperature)[0] for p, r in zip(PROMPTS, RESPONSES)]
        ref_lp = [logprobs_alone(models["ref"], p, r, temperature)[0] for p, r in zip(PROMPTS, RESPONSES)]
        score = [chain_alone(models["rm"], [], p, r)[-1].item() / SCALE for p, r in zip(PROMPTS, RESPONSES)]
        greedy = [chain_alone(models["rm"], [], p, r)[-1].item() / SCALE for p, r in zip(*greedy_rows)]
    kl = [(o - f).tolist() for o, f in zip(old_lp, ref_lp)]
    a_hat = group_baseline(score, n, estimator, greedy)
    adv = [[a * GAMMA ** (len(kr) - 1 - t) + sum(GAMMA ** (k - t) * -BETA * kr[k] for k in range(t, len(kr)))
            for t in range(len(kr))] for a, kr in zip(a_hat, kl)]
    torch.testing.assert_close(sc["score"], torch.tensor(score), atol=2e-5, rtol=1e-4)
    assert_rows(sc["kl"], kl, "kl")
    assert_rows(sc["adv"], adv, "advantages", atol=1e-4)

    opt = recording_sgd(models["new"])
    stats, n_steps = grpo_baseline.update(models["new"], opt, models["batch"], sc, cfg, 0, 0)
    assert n_steps == len(opt.grads) == 4
    clipfrac = check_policy_updates(models["new"], cfg, stats, opt, old_lp, adv, temperature)
    assert 0.05 < clipfrac < 0.95


def test_lr0_step_at_temperature_07_has_ratio_one(models):
    """One DVPO and one PPO step at lr 0, temperature 0.7, the reference a copy of the policy: the
    sampling-time, old, reference and training log-probs are the same function (same temperature), so
    KL 0, ratio 1, clipfrac 0, approx_kl 0."""
    policy, ref = copy.deepcopy(models["old"]), copy.deepcopy(models["old"]).eval()
    batch = models["batch"]
    kw = dict(batch_size=8, minibatch_size=4, micro_batch_size=2, ppo_epochs=2, lr=0.0, temperature=0.7)
    cfg = dvpo.Config(**kw)
    sc = dvpo.score(policy, ref, models["gvm"], batch, TAU, BETA, 1.0, cfg, PAD, "cpu")
    stats, _ = dvpo.update(policy, recording_sgd(policy), batch, sc, cfg, 0, 0)
    pcfg = ppo_baseline.Config(**kw, critic_lr=0.0)
    critic = copy.deepcopy(models["critic"])
    psc = ppo_baseline.score(policy, ref, models["rm"], critic, batch, BETA, 1.0, pcfg, "cpu")
    pstats, _ = ppo_baseline.update(policy, critic, recording_sgd(policy), recording_sgd(critic), batch, psc, pcfg,
                                    0, 0)
    for s, c in ((stats, sc), (pstats, psc)):
        assert c["kl"].abs().max().item() == 0.0
        assert max(x.item() for x in s["clipfrac"]) == 0.0
        assert max(x.item() for x in s["approx_kl"]) < 1e-12
    # the same rows scored at temperature 1 differ: the check above is not vacuous
    t1 = mdl.frozen_logprobs(policy, batch, batch["response"].shape[1], 1.0)
    assert ((t1 - sc["old_logp"]) * sc["mask"]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# Read positions on a hand-made chain (docs/algorithm.md §1)

class TokenValues(torch.nn.Module):
    """A value model whose value at a position is that of the token there, u_i = table[z_i] (causal: it
    depends on z_i only). Every read position shows: a read one position off returns another token's value."""

    def __init__(self, table: dict):
        super().__init__()
        self.table = torch.full((len(TOK),), 77.0)  # padding and unlisted tokens: a value no chain holds
        for token, v in table.items():
            self.table[token] = v

    def forward(self, input_ids, attention_mask):
        return self.table[input_ids]


# row 0: x = (10, 11, 12), y = (20, 21, 22, 23): chain w = [.1, .3, .2, .6, .9] (docs/algorithm.md §10);
# row 1: x = (13, 14), left-padded, y = (30, 31): w = [-.2, .4, -.5]; the τ prefix (40, 41) reads 5 and 6
CHAIN_PROMPTS, CHAIN_RESPONSES = [[10, 11, 12], [13, 14]], [[20, 21, 22, 23], [30, 31]]
CHAIN_TABLE = {10: 1.0, 11: 2.0, 13: 3.0, 40: 5.0, 41: 6.0, 12: 0.1, 20: 0.3, 21: 0.2, 22: 0.6, 23: 0.9,
               14: -0.2, 30: 0.4, 31: -0.5}
# by hand, γ = 1, λ = 0.95, no KL: δ = [.2, -.1, .4, .3] and [.6, -.9]; A_t = δ_t + .95 A_{t+1}; R_t = A_t + w_{t-1}
CHAIN_ADV = [[0.7232125, 0.55075, 0.685, 0.3], [-0.255, -0.9]]
CHAIN_RETURNS = [[0.8232125, 0.85075, 0.885, 0.9], [-0.455, -0.5]]


def test_critic_reads_V_t_at_P_plus_t_minus_2_and_returns_follow():
    """The critic's V_t is read at P+t-2, where w_{t-1} is, on the left-padded rollout layout; the RM's
    score at the last response token; PPO's returns R_t = A_t + V_t from the raw advantages end in
    R_T = RM(x, y). Hand numbers from the §1 picture."""
    values = TokenValues(CHAIN_TABLE)
    batch = rollout_batch(CHAIN_PROMPTS, CHAIN_RESPONSES)
    V = ppo_baseline.critic_values(values, batch, 4)
    assert_rows(V * data.response_mask(batch["response_len"], 4), [[0.1, 0.3, 0.2, 0.6], [-0.2, 0.4]], "V_t")
    policy = lm(0)
    cfg = ppo_baseline.Config(gamma=1.0, lam=0.95, micro_batch_size=1)
    sc = ppo_baseline.score(policy, policy, values, values, batch, BETA, 1.0, cfg, "cpu")  # π_ref = π: no KL
    torch.testing.assert_close(sc["score"], torch.tensor([0.9, -0.5]))
    assert_rows(sc["returns"], CHAIN_RETURNS, "returns")
    assert_rows(sc["adv"], whiten(CHAIN_ADV), "advantages")


@pytest.mark.parametrize("advantage", ["td", "paper"])
def test_dvpo_reads_the_chain_after_the_tau_prefix(advantage):
    """The GVM's chain starts at the last prompt token of [τ] ⊕ x ⊕ y (P counts τ): `td` gives the hand
    advantages of the same chain, `paper` normalizes w_1..w_T (never w_0)."""
    values = TokenValues(CHAIN_TABLE)
    batch = rollout_batch(CHAIN_PROMPTS, CHAIN_RESPONSES)
    policy = lm(0)
    cfg = dvpo.Config(gamma=1.0, lam=0.95, micro_batch_size=1, advantage=advantage)
    sc = dvpo.score(policy, policy, values, batch, [[40, 41], [41]], BETA, 1.0, cfg, PAD, "cpu")
    torch.testing.assert_close(sc["w"][0], torch.tensor([0.1, 0.3, 0.2, 0.6, 0.9]))
    torch.testing.assert_close(sc["w"][1, :3], torch.tensor([-0.2, 0.4, -0.5]))
    want = whiten(CHAIN_ADV) if advantage == "td" else whiten([[0.3, 0.2, 0.6, 0.9], [0.4, -0.5]])
    assert_rows(sc["adv"], want, "advantages")


# ----------------------------------------------------------------------------------------------
# Value-model training steps: GVM (TD(λ), semi-gradient) and reward model (Bradley-Terry)

def pair_examples(n: int) -> list[dict]:
    """n preference pairs as token ids ({prompt, chosen, rejected, policy}), responses of several lengths."""
    out = []
    for i in range(n):
        p = PROMPTS[i % 8]
        out.append({"prompt": p, "chosen": RESPONSES[(i + 1) % 8], "rejected": RESPONSES[(i + 5) % 8][:3] + [EOS],
                    "policy": "A"})
    return out


def lambda_returns(w: list, R: float) -> list:
    """G_T = R, G_k = γ((1 - λ) w_{k+1} + λ G_{k+1}) (§2), on plain floats."""
    G = [0.0] * len(w)
    G[-1] = R
    for k in reversed(range(len(w) - 1)):
        G[k] = GAMMA * ((1 - LAM) * w[k + 1] + LAM * G[k + 1])
    return G


def test_gvm_step_gradient_is_the_semi_gradient_of_td_lambda():
    """gvm.train_step on 4 pairs in 2 micro-batches: its loss is ½ Σ (w - G)² / N over every chain entry of
    the batch (w_0 included, N their number), and its gradient is that of the same expression with the
    λ-return targets G held constant (computed from the detached chain): a semi-gradient."""
    examples = pair_examples(4)
    cfg = gvm.Config(batch_size=4, micro_batch_size=2, lr=0.0, grad_clip=1e9, gamma=GAMMA, lam=LAM)
    vm = value_model(5)
    opt = recording_sgd(vm)
    loss, _ = gvm.train_step(vm, opt, examples, [0, 1, 2, 3], "preference", gvm.tau_pools(examples, "preference"),
                             cfg, 0, 1, PAD, lambda e, k: 1.0 if k == "chosen" else -1.0, "cpu")
    terms = []
    for e in examples:
        for k, R in (("chosen", 1.0), ("rejected", -1.0)):
            w = chain_alone(vm, [], e["prompt"], e[k])  # (T+1,): w_0..w_T
            G = torch.tensor(lambda_returns(w.tolist(), R))  # constants: no gradient through the targets
            terms.append(0.5 * (w - G) ** 2)
    want = torch.cat(terms).sum() / sum(len(t) for t in terms)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert_grads_close(opt.grads[0], torch.autograd.grad(want, list(vm.parameters())), "GVM")


def test_gvm_semi_gradient_differs_from_the_full_gradient():
    """The check above can tell the two apart: differentiating through the targets gives another gradient."""
    e = pair_examples(1)[0]
    vm = value_model(5)
    w = chain_alone(vm, [], e["prompt"], e["chosen"])
    G = torch.stack(lambda_returns(list(w), 1.0)[:-1] + [torch.tensor(1.0)])  # the targets as a function of w
    full = torch.autograd.grad((0.5 * (w - G) ** 2).sum(), vm.value_head.weight, retain_graph=True)[0]
    semi = torch.autograd.grad((0.5 * (w - G.detach()) ** 2).sum(), vm.value_head.weight)[0]
    assert (full - semi).abs().max() > 0.1 * semi.abs().max()


def test_reward_model_step_gradient_is_the_bradley_terry_gradient():
    """reward_model.train_step on 4 pairs in 2 micro-batches: loss Σ -log σ(r_c - r_r) / (pairs of the
    batch), r read at each response's last token, and its gradient."""
    examples = pair_examples(4)
    cfg = reward_model.Config(batch_size=4, micro_batch_size=2, lr=0.0, grad_clip=1e9)
    vm = value_model(6)
    opt = recording_sgd(vm)
    loss, _ = reward_model.train_step(vm, opt, examples, [0, 1, 2, 3], cfg, 0, 1, PAD, "cpu")
    r = [[chain_alone(vm, [], e["prompt"], e[k])[-1] for k in ("chosen", "rejected")] for e in examples]
    want = sum(-torch.nn.functional.logsigmoid(c - rj) for c, rj in r) / len(examples)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert_grads_close(opt.grads[0], torch.autograd.grad(want, list(vm.parameters())), "reward model")


def test_dpo_step_gradient_is_the_dpo_gradient(models):
    """dpo_baseline.train_step on 4 pairs in 2 micro-batches: loss Σ -log σ(β[(log π(y_c) - log π_ref(y_c)) -
    (log π(y_r) - log π_ref(y_r))]) / (pairs of the batch), sequence log-probs summed over each response's
    tokens at temperature 1, and its gradient; the margins it returns are those of each pair."""
    examples = pair_examples(4)
    cfg = dpo_baseline.Config(batch_size=4, micro_batch_size=2, lr=0.0, grad_clip=1e9, beta=0.5)
    policy = models["new"]
    opt = recording_sgd(policy)
    loss, _, margin = dpo_baseline.train_step(policy, models["ref"], opt, examples, [0, 1, 2, 3], cfg, 0, 1, PAD,
                                              "cpu")

    def seq(m, e, k):
        return logprobs_alone(m, e["prompt"], e[k], 1.0)[0].sum()
    with torch.no_grad():
        ref = [[seq(models["ref"], e, k) for k in ("chosen", "rejected")] for e in examples]
    m = [cfg.beta * ((seq(policy, e, "chosen") - rc) - (seq(policy, e, "rejected") - rr))
         for e, (rc, rr) in zip(examples, ref)]
    want = sum(-torch.nn.functional.logsigmoid(x) for x in m) / len(examples)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(margin, torch.stack(m).detach(), atol=1e-5, rtol=1e-4)
    assert_grads_close(opt.grads[0], torch.autograd.grad(want, list(policy.parameters())), "DPO")


# ----------------------------------------------------------------------------------------------
# The evaluation: undefined standard error, rewards at the rollout's stop tokens

def test_reward_stderr_is_undefined_with_one_heldout_prompt():
    """A standard error needs two samples: with one held-out prompt it is nan in evaluate_policy's result
    and absent from summary.json's entries (JSON has no nan); with three it is the sample one, s / √n."""
    policy = lm(0)

    def reward(prompt, response):  # a known number per prompt
        return float(len(prompt))
    one = evaluation.evaluate_policy(policy, policy, TOK, ["52817:"], "cpu", 0, 4, reward)
    assert math.isnan(one["reward_stderr"]) and math.isnan(one["kl_to_ref_stderr"]) and one["reward"] == 6.0
    summary = evaluation.eval_summary(one, one)
    assert "eval/reward_stderr" not in summary and "eval/kl_to_ref_stderr" not in summary
    assert summary["eval/reward_after"] == 6.0 and summary["eval/kl_to_ref"] == 0.0
    three = evaluation.evaluate_policy(policy, None, TOK, ["52817:", "903:", "61:"], "cpu", 0, 4, reward)
    x = torch.tensor([6.0, 4.0, 3.0], dtype=torch.float64)
    assert three["reward_stderr"] == pytest.approx((x.std() / math.sqrt(3)).item())
    assert evaluation.eval_summary(three, three)["eval/reward_stderr"] == pytest.approx(three["reward_stderr"])


def test_rewards_decode_at_the_rollouts_stop_tokens():
    """A response that stopped at a token the model's generation_config lists (a plain character here) is
    cut there when decoded for the reward, as sampling cut it; the tokenizer's stop tokens alone do not."""
    stops = data.stop_token_ids(TOK, type("G", (), {"eos_token_id": ids("7")})())
    response = torch.tensor([ids("12") + ids("7") + [PAD, PAD]])
    seen = []
    evaluation.rewards(lambda p, r: seen.append(r) or 0.0, ["x:"], response, TOK, stops)
    evaluation.rewards(lambda p, r: seen.append(r) or 0.0, ["x:"], response, TOK)
    assert seen == ["12", "127"]
