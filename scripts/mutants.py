"""scripts/mutants.py — a mutation check of the tests: plausible one-line bugs in the algorithm and in its
wiring, planted one at a time in a temporary copy of the repository; each copy runs the fast test subset
(one thread, stopping at the first failure), and a table says which mutants a test killed, and which test.

  python scripts/mutants.py                          # every mutant, then the table
  python scripts/mutants.py --only kl-sign,td-no-whitening
  python scripts/mutants.py --write docs/mutants.md  # the table, the command and the wall time, as markdown
  python scripts/mutants.py --list                   # check that every mutant still applies, and list them

Not run in CI: the whole list takes about 40 minutes on a 2-core machine shared with other jobs (each mutant
is a fresh pytest process; a killed mutant stops at its first failure, a survivor runs the whole subset of
about 2 minutes). A mutant is an exact string that must occur exactly once in its file: when a refactor
moves the line the script stops, naming the mutant, instead of planting nothing (update the entry). A
mutant that no test can kill because it cannot change any number says why in `harmless`. Adding a file's
mutants is one entry of MUTANTS: (file, [Mutant(...), ...]).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the fast subset, cheapest first: pure functions, the steps against plain loops, pools and splits, the
# scripts' main() wiring, data and model readers, 1-vs-2-process equivalence (gloo)
FAST = ["tests/test_algorithms.py", "tests/test_seams.py", "tests/test_splits.py", "tests/test_wiring.py",
        "tests/test_data.py", "tests/test_equivalence.py"]


ABOUT = """Each row is one plausible bug, planted alone in a temporary copy of the repository (the exact text
replaced is in `scripts/mutants.py`); "killed by" names the first test that failed. Bugs that only a
multi-process run can show (a local instead of a global count, a missing `* world`, batch statistics that
are not all-reduced) are killed by `tests/test_equivalence.py` (1 vs 2 gloo processes); bugs in a script's
`main()` wiring by `tests/test_wiring.py`. A survivor marked harmless cannot change any number; the note
says why."""


@dataclass
class Mutant:
    name: str
    old: str  # exact text, found once in the file
    new: str
    what: str  # the bug, in words
    harmless: str = ""  # why no test can kill it (it cannot change any number), if so


DVPO = [
    Mutant("kl-sign", "    r_kl = -beta * kl\n", "    r_kl = beta * kl\n",
           "the KL penalty enters the reward with the wrong sign"),
    Mutant("kl-direction", "kl = (old_logp - ref_logp) * mask", "kl = (ref_logp - old_logp) * mask",
           "k1 estimator the wrong way round: log π_ref - log π_old"),
    Mutant("kl-unmasked", "kl = (old_logp - ref_logp) * mask", "kl = old_logp - ref_logp",
           "the KL on padding positions is kept (wrong mask)"),
    Mutant("td-no-whitening", "        adv = masked_batch_norm(adv_raw, mask)", "        adv = adv_raw",
           "`td` advantages not whitened"),
    Mutant("td-value-one-late", "gae_with_terminal_reward(w[:, :-1],", "gae_with_terminal_reward(w[:, 1:],",
           "`td` reads V_t = w_t instead of w_{t-1} (off by one)"),
    Mutant("td-terminal-one-early", "model.terminal(w[:, 1:], mask), r_kl", "model.terminal(w[:, :-1], mask), r_kl",
           "`td` terminal reward w_{T-1} instead of w_T"),
    Mutant("paper-pre-token-Q", "return masked_batch_norm(w[:, 1:], mask)", "return masked_batch_norm(w[:, :-1], mask)",
           "`paper` normalizes w_{t-1} (a pure baseline) instead of Q_t = w_t"),
    Mutant("paper-no-kl-to-go", "return masked_batch_norm(w[:, 1:], mask) + discounted_cumsum(r_kl, mask, gamma)",
           "return masked_batch_norm(w[:, 1:], mask)", "`paper` advantages without the KL reward-to-go"),
    Mutant("kl-to-go-immediate", "        run = (r[:, t] + gamma * run) * mask[:, t]",
           "        run = r[:, t] * mask[:, t]", "the KL reward-to-go is only the immediate KL"),
    Mutant("gvm-unscaled", "device, cfg.micro_batch_size) / scale  # DVPO only",
           "device, cfg.micro_batch_size)  # DVPO only", "the GVM chain is not divided by its scale (docs §7)"),
    Mutant("bn-sample-std", "sigma = math.sqrt(max(s2 / n - mu * mu, 0.0))",
           "sigma = math.sqrt(max(s2 / n - mu * mu, 0.0) * n / max(n - 1, 1))",
           "batch norm divides by the sample std instead of the population std"),
    Mutant("bn-local-stats", "        dist.all_reduce(stats, op=dist.ReduceOp.SUM)", "        pass",
           "batch-norm statistics of this rank only (not all-reduced)"),
    Mutant("bn-fp32", "    xd, md = x.double(), mask.double()", "    xd, md = x.float(), mask.float()",
           "batch-norm sums in fp32 (catastrophic cancellation, docs §3)"),
    Mutant("gae-no-lambda", "        last = (delta + gamma * lam * m_next * last) * mask[:, t]",
           "        last = (delta + gamma * m_next * last) * mask[:, t]", "GAE ignores λ"),
    Mutant("gae-bootstrap-past-end", "values[:, t + 1 if t + 1 < T else t] * m_next - values[:, t]",
           "values[:, t + 1 if t + 1 < T else t] - values[:, t]", "GAE bootstraps from past a row's last token"),
    Mutant("terminal-reward-one-early", "scatter(1, model.last_index(mask)[:, None], 1.0)",
           "scatter(1, (model.last_index(mask) - 1).clamp(min=0)[:, None], 1.0)",
           "the terminal score is added one token before the last"),
    Mutant("clip-min", "    loss = (torch.max(pg_loss1, pg_loss2) * mask).sum() / n_tokens",
           "    loss = (torch.min(pg_loss1, pg_loss2) * mask).sum() / n_tokens",
           "clipped objective: min instead of max"),
    Mutant("loss-unmasked", "    loss = (torch.max(pg_loss1, pg_loss2) * mask).sum() / n_tokens",
           "    loss = torch.max(pg_loss1, pg_loss2).sum() / n_tokens",
           "padding tokens in the policy loss (wrong mask)",
           harmless="the advantages are exactly 0 on padding (masked batch norm and the masked KL-to-go write 0 "
                    "there; test_seams checks it), so every padding term is max(-0·ρ, -0·clip(ρ)) = 0: no number "
                    "changes, the loss and its gradient included"),
    Mutant("ratio-inverted", "    logratio = logp - old_logp", "    logratio = old_logp - logp",
           "ρ = π_old / π_θ instead of π_θ / π_old"),
    Mutant("clip-branch-sign", "    pg_loss2 = -adv * torch.clamp(", "    pg_loss2 = adv * torch.clamp(",
           "the clipped branch has the wrong sign"),
    Mutant("approx-kl-k1", "masked_mean(0.5 * logratio ** 2, mask)", "masked_mean(logratio, mask)",
           "logged approx_kl is the k1 estimator, not ½ (log ρ)²"),
    Mutant("tokens-local", "n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone())",
           "n_tokens = mask[mb_idx].sum().detach().clone()",
           "policy loss over this rank's tokens, not the global count"),
    Mutant("tokens-whole-batch", "n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone())",
           "n_tokens = fu.all_reduce_sum(mask.sum().detach().clone())",
           "policy loss over the rollout batch's tokens, not the minibatch's"),
    Mutant("backward-no-world", "                (loss * world).backward()", "                loss.backward()",
           "the policy gradient is not multiplied by world (FSDP averages it)"),
    Mutant("train-logp-no-temperature", "model.response_logprobs(policy, sub, T, cfg.temperature, with_entropy=True)",
           "model.response_logprobs(policy, sub, T, with_entropy=True)",
           "training log-probs at temperature 1 (old and reference at cfg.temperature)"),
    Mutant("ref-logp-no-temperature", "ref_logp = model.frozen_logprobs(ref, batch, T, cfg.temperature,",
           "ref_logp = model.frozen_logprobs(ref, batch, T, 1.0,", "reference log-probs at temperature 1"),
    Mutant("rollout-no-temperature",
           "tok, cfg.max_new_tokens, cfg.temperature,\n                              cfg.top_p, gen",
           "tok, cfg.max_new_tokens, 1.0,\n                              cfg.top_p, gen",
           "rollouts sampled at temperature 1"),
    Mutant("tau-same-prompt", "        cands = [c for c in pool if c[0] != p]", "        cands = list(pool)",
           "τ may come from the row's own prompt"),
    Mutant("tau-this-step", 'pool = state["tau_pool"] or list(', "pool = list(",
           "τ from this step's rollouts instead of the previous step's"),
    Mutant("tau-after-prompt", '    prompts = [t + p for t, p in zip(tau, batch["prompt_ids"])]',
           '    prompts = [p + t for t, p in zip(tau, batch["prompt_ids"])]', "τ placed after the prompt"),
    Mutant("reward-tokenizer-stops", 'batch["response"], tok, stops)', 'batch["response"], tok)',
           "per-step rewards decoded at the tokenizer's stop tokens, not the rollout's"),
    Mutant("chance-warning-unwired", "    if warning := model.chance_warning(gcfg, cfg.gvm):",
           '    if warning := "":', "no warning before RL on a GVM at chance"),
]

PPO = [
    Mutant("ppo-kl-sign", "    r_kl = -beta * kl\n", "    r_kl = beta * kl\n", "the KL penalty with the wrong sign"),
    Mutant("critic-one-late", '    return model.gather_response(u, batch["prompt_len"] - 1, T)',
           '    return model.gather_response(u, batch["prompt_len"], T)', "the critic's V_t read at P+t-1 (one late)"),
    Mutant("returns-whitened", "    returns = (adv_raw + old_values) * mask",
           "    returns = (masked_batch_norm(adv_raw, mask) + old_values) * mask",
           "returns from the whitened advantages instead of the raw ones"),
    Mutant("value-loss-min", "    return 0.5 * (torch.max((values - returns) ** 2,",
           "    return 0.5 * (torch.min((values - returns) ** 2,", "clipped value loss: min instead of max"),
    Mutant("value-clip-around-returns", "    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)",
           "    v_clipped = returns + torch.clamp(values - returns, -clip, clip)",
           "the value clip is centred on the returns, not on V_old"),
    Mutant("vloss-unmasked", "(v_clipped - returns) ** 2) * mask).sum() / n_tokens",
           "(v_clipped - returns) ** 2)).sum() / n_tokens", "padding positions in the value loss (wrong mask)"),
    Mutant("rm-unscaled", "rm_score = model.frozen_terminal_values(scorer, batch, cfg.micro_batch_size) / scale",
           "rm_score = model.frozen_terminal_values(scorer, batch, cfg.micro_batch_size)",
           "the RM score is not divided by its scale"),
    Mutant("ppo-train-logp-no-temperature",
           "model.response_logprobs(policy, sub, T, cfg.temperature, with_entropy=True)",
           "model.response_logprobs(policy, sub, T, with_entropy=True)", "PPO training log-probs at temperature 1"),
    Mutant("ppo-tokens-local", "n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone())",
           "n_tokens = mask[mb_idx].sum().detach().clone()", "PPO losses over this rank's tokens"),
    Mutant("vloss-backward-no-world", "                (vloss * world).backward()", "                vloss.backward()",
           "the critic's gradient is not multiplied by world"),
    Mutant("ppo-reward-tokenizer-stops", 'batch["response"], tok, stops)', 'batch["response"], tok)',
           "PPO's per-step rewards decoded at the tokenizer's stop tokens"),
]

GVM = [
    Mutant("targets-not-detached", 'G = td_lambda_targets(w.detach(), batch["R"]',
           'G = td_lambda_targets(w, batch["R"]', "gradient flows through the bootstrapped TD targets"),
    Mutant("chain-count-without-w0", "sum(len(examples[i][key]) + 1 for i in idx for key in keys)",
           "sum(len(examples[i][key]) for i in idx for key in keys)", "TD loss divided by T instead of T+1 entries"),
    Mutant("gvm-count-local", "    n_valid = fu.all_reduce_sum(n_local)", "    n_valid = n_local",
           "TD loss over this rank's chain entries"),
    Mutant("lambda-swapped", "        boot = gamma * ((1 - lam) * w_next + lam * nxt)",
           "        boot = gamma * (lam * w_next + (1 - lam) * nxt)", "λ and 1-λ swapped in the λ-return"),
    Mutant("label-flip", '            return 1.0 if k == "chosen" else -1.0',
           '            return -1.0 if k == "chosen" else 1.0', "chosen gets R = -1"),
    Mutant("tau-pool-chosen-only",
           '        for k in (("chosen", "rejected") if kind == "preference" else ("response",)):\n            pools',
           '        for k in (("chosen",) if kind == "preference" else ("response",)):\n            pools',
           "τ drawn from chosen responses only (label leakage)"),
    Mutant("gvm-tau-same-prompt", '        if j != i and p != e["prompt"]:', "        if j != i:",
           "τ may come from another pair with the same prompt"),
    Mutant("heldout-in-train-tau", "    pools, held_pools = tau_pools(train, kind), tau_pools(held, kind)",
           "    pools, held_pools = tau_pools(train + held, kind), tau_pools(held, kind)",
           "held-out responses in the training τ pool"),
    Mutant("config-pairs-from-train", '"eval/pairwise_accuracy"], "eval/pairs": len(held)})',
           '"eval/pairwise_accuracy"], "eval/pairs": len(train)})',
           "the GVM's config records the training pair count beside the held-out accuracy"),
]

RM = [
    Mutant("bt-sign", "(-F.logsigmoid(r_chosen - r_rejected))", "(-F.logsigmoid(r_rejected - r_chosen))",
           "Bradley-Terry prefers the rejected response"),
    Mutant("bt-micro-pairs", "loss = bt_loss(r[0::2], r[1::2], cfg.batch_size)",
           "loss = bt_loss(r[0::2], r[1::2], len(r) // 2)", "BT loss a mean over the micro-batch's pairs"),
    Mutant("bt-local-pairs", "loss = bt_loss(r[0::2], r[1::2], cfg.batch_size)",
           "loss = bt_loss(r[0::2], r[1::2], len(idx))", "BT loss a mean over this rank's pairs"),
]

MODEL = [
    Mutant("logp-no-temperature", "    logp_all = F.log_softmax(chunk.float() / temperature, dim=-1)",
           "    logp_all = F.log_softmax(chunk.float(), dim=-1)", "log-probs ignore the temperature"),
    Mutant("sample-no-temperature", "    probs = F.softmax(logits.float() / temperature, dim=-1)",
           "    probs = F.softmax(logits.float(), dim=-1)", "sampling ignores the temperature"),
    Mutant("chain-offset", "    return gather_response(u, prompt_len - 1, T + 1)",
           "    return gather_response(u, prompt_len, T + 1)", "value chain read one position late"),
    Mutant("chance-never-warns", "    if acc - 0.5 >= two_se:\n", "    if True:\n",
           "chance_warning never warns"),
]

EVALUATION = [
    Mutant("stderr-one-prompt", 'return math.sqrt(max(m2 / n - m * m, 0) / (n - 1)) if n > 1 else float("nan")',
           "return math.sqrt(max(m2 / n - m * m, 0) / max(n - 1, 1))", "standard error 0 with one held-out prompt"),
    Mutant("eval-reward-tokenizer-stops", 'b["response"], tok, stops), dtype', 'b["response"], tok), dtype',
           "held-out rewards decoded at the tokenizer's stop tokens"),
    Mutant("eval-kl-no-temperature", "logp = model.frozen_logprobs(policy, b, T, temperature, micro_batch_size)",
           "logp = model.frozen_logprobs(policy, b, T, 1.0, micro_batch_size)",
           "held-out KL log-probs at temperature 1"),
    Mutant("heldout-prompts-trained", '[r["prompt"] for r in train_rows], [r["prompt"] for r in eval_rows]',
           '[r["prompt"] for r in rows], [r["prompt"] for r in eval_rows]', "held-out prompts also in training"),
]

DATA = [
    Mutant("mask-inclusive", "[None, :] < response_len[:, None]).float()",
           "[None, :] <= response_len[:, None]).float()", "response mask one entry too long"),
    Mutant("split-leak", "    return rows[k:], rows[:k]", "    return rows, rows[:k]",
           "held-out rows also in training"),
]

TASK = [
    Mutant("builtin-pairs-eval-from-train",
           'prompts = builtin_prompts(n, split, seed=tu.seed_for(seed, "pairs/prompts", i))',
           'prompts = builtin_prompts(n, "train", seed=tu.seed_for(seed, "pairs/prompts", i))',
           "held-out preference pairs drawn from training prompts"),
]

GRPO = [
    Mutant("grpo-std-population", "return ((g - mean) / (g.std(1, keepdim=True) + eps)).view(-1)",
           "return ((g - mean) / (g.std(1, keepdim=True, unbiased=False) + eps)).view(-1)",
           "GRPO divides by the population std instead of the sample std"),
    Mutant("grpo-not-centred", "return ((g - mean) / (g.std(1, keepdim=True) + eps)).view(-1)",
           "return (g / (g.std(1, keepdim=True) + eps)).view(-1)", "GRPO's group mean is not subtracted"),
    Mutant("rloo-plain-mean", "return ((g - mean) * group_size / (group_size - 1)).view(-1)",
           "return (g - mean).view(-1)", "RLOO uses the group mean (itself included) as its baseline"),
    Mutant("remax-sign", "        return scores - baseline", "        return baseline - scores",
           "ReMax advantage with the wrong sign"),
    Mutant("remax-baseline-tiled", "baseline = greedy.repeat_interleave(cfg.group_size)",
           "baseline = greedy.repeat(cfg.group_size)", "ReMax's greedy baselines assigned to the wrong groups"),
    Mutant("grpo-kl-sign", "    r_kl = -beta * kl\n", "    r_kl = beta * kl\n",
           "GRPO's KL penalty with the wrong sign"),
    Mutant("grpo-no-kl-to-go", "            + discounted_cumsum(r_kl, mask, gamma)) * mask",
           "            + r_kl) * mask", "GRPO adds only the immediate KL, not its reward-to-go"),
    Mutant("grpo-score-unscaled", "s = model.frozen_terminal_values(scorer, batch, cfg.micro_batch_size) / scale",
           "s = model.frozen_terminal_values(scorer, batch, cfg.micro_batch_size)",
           "the scorer's score is not divided by its scale"),
    Mutant("grpo-tokens-local", "n_tokens = fu.all_reduce_sum(mask[mb_idx].sum().detach().clone())",
           "n_tokens = mask[mb_idx].sum().detach().clone()", "GRPO's loss over this rank's tokens"),
    Mutant("grpo-train-logp-no-temperature",
           "model.response_logprobs(policy, sub, T, cfg.temperature, with_entropy=True)",
           "model.response_logprobs(policy, sub, T, with_entropy=True)", "GRPO training log-probs at temperature 1"),
    Mutant("grpo-groups-interleaved", "[my_prompts[i] for i in idx for _ in range(cfg.group_size)], tok,",
           "[my_prompts[i] for _ in range(cfg.group_size) for i in idx], tok,",
           "a prompt's n responses are not consecutive rows (the groups mix prompts)"),
    Mutant("grpo-chance-warning-unwired", "    if warning := model.chance_warning(rcfg, reward_path):",
           '    if warning := "":', "no warning before RL on a scorer at chance"),
]

DPO = [
    Mutant("dpo-sign", "margin = beta * ((logp_c - ref_c) - (logp_r - ref_r))",
           "margin = beta * ((logp_r - ref_r) - (logp_c - ref_c))", "DPO prefers the rejected response"),
    Mutant("dpo-no-reference", "margin = beta * ((logp_c - ref_c) - (logp_r - ref_r))",
           "margin = beta * (logp_c - logp_r)", "DPO without the reference's log-probs"),
    Mutant("dpo-length-normalized", "    return (logp * mask).sum(1)\n",
           "    return (logp * mask).sum(1) / mask.sum(1)\n",
           "sequence log-probs averaged over tokens instead of summed"),
    Mutant("dpo-micro-pairs", "cfg.batch_size)  # a mean over the pairs of the global batch",
           "len(idx[mi:mi + micro]))  # a mean over the pairs of the global batch",
           "DPO loss a mean over the micro-batch's pairs"),
    Mutant("dpo-local-pairs", "cfg.batch_size)  # a mean over the pairs of the global batch",
           "cfg.batch_size // world)  # a mean over the pairs of the global batch",
           "DPO loss a mean over this rank's pairs"),
]

MUTANTS = [("dvpo.py", DVPO), ("ppo_baseline.py", PPO), ("grpo_baseline.py", GRPO), ("dpo_baseline.py", DPO),
           ("gvm.py", GVM), ("reward_model.py", RM),
           ("model.py", MODEL), ("evaluation.py", EVALUATION), ("data.py", DATA), ("task.py", TASK)]


def check(selected) -> None:
    """Every selected mutant's text occurs exactly once in its file: fail loudly, before any run, if not."""
    bad = []
    for path, m in selected:
        n = open(os.path.join(ROOT, path)).read().count(m.old)
        if n != 1:
            bad.append(f"{m.name} ({path}): its text occurs {n} times, not once")
    names = [m.name for _, m in selected]
    bad += [f"{n}: the name is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if bad:
        sys.exit("scripts/mutants.py: stale mutants, update their text:\n  " + "\n  ".join(bad))


def copy_repo(dest: str) -> None:
    """The working tree's tracked and untracked-but-not-ignored files (no out/, no caches)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def run_subset(repo: str, tests: list[str], timeout: int) -> tuple[str, str, float]:
    """(outcome, first failing test, seconds): outcome passed / failed / error (pytest could not run) / timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.time() - t0
    dt = time.time() - t0
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", p.stdout, re.M)
    test = first.group(1) if first else ""
    if p.returncode == 0:
        return "passed", "", dt
    if p.returncode == 1:
        return "failed", test, dt
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "no output"
    return "error", test or last, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--list", action="store_true", help="check and list the mutants, run nothing")
    ap.add_argument("--write", default="", help="also write the table as markdown to this file")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run of the subset")
    ap.add_argument("--tests", default="", help="comma-separated test files or ids instead of the fast subset")
    args = ap.parse_args()
    selected = [(path, m) for path, ms in MUTANTS for m in ms]
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for _, m in selected}
        if unknown:
            sys.exit(f"scripts/mutants.py: no mutant named {', '.join(sorted(unknown))}")
        selected = [(p, m) for p, m in selected if m.name in names]
    check(selected)
    tests = args.tests.split(",") if args.tests else FAST
    if args.list:
        for path, m in selected:
            print(f"{m.name:32} {path:18} {m.what}")
        print(f"{len(selected)} mutants, every one applies")
        return

    t_start = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        copy_repo(tmp)
        outcome, test, base_s = run_subset(tmp, tests, args.timeout)
        if outcome != "passed":
            sys.exit(f"scripts/mutants.py: the unmutated tests do not pass ({outcome}: {test})")
        print(f"unmutated: passed in {base_s:.0f} s", flush=True)
        for n, (path, m) in enumerate(selected, 1):
            target = os.path.join(tmp, path)
            original = open(target).read()
            with open(target, "w") as f:
                f.write(original.replace(m.old, m.new, 1))
            try:
                outcome, test, dt = run_subset(tmp, tests, args.timeout)
            finally:
                with open(target, "w") as f:
                    f.write(original)
            result = {"failed": "killed", "error": "killed (error)", "timeout": "killed (timeout)",
                      "passed": "survived"}[outcome]
            rows.append((n, m, path, result, test, dt))
            print(f"[{n}/{len(selected)}] {m.name}: {result} {test} ({dt:.0f} s)", flush=True)
    wall = time.time() - t_start

    killed = sum(r[3].startswith("killed") for r in rows)
    harmless = sum(r[3] == "survived" and bool(r[1].harmless) for r in rows)
    lines = ["| # | mutant | file | what it changes | result | killed by |", "|---|---|---|---|---|---|"]
    for n, m, path, result, test, _ in rows:
        note = f" — harmless: {m.harmless}" if m.harmless and result == "survived" else ""
        lines.append(f"| {n} | `{m.name}` | {path} | {m.what}{note} | {result} | {f'`{test}`' if test else ''} |")
    summary = (f"{killed} of {len(rows)} mutants killed ({100 * killed / len(rows):.1f}%), {len(rows) - killed} "
               f"survived ({harmless} of them harmless: no number can change); wall time {wall / 60:.1f} min "
               f"(the unmutated tests: {base_s:.0f} s)")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + summary)
    if args.write:
        cmd = "python scripts/mutants.py" + "".join(f" --{k} {getattr(args, k)}" for k in ("only", "tests")
                                                   if getattr(args, k)) + f" --write {args.write}"
        with open(os.path.join(ROOT, args.write), "w") as f:
            f.write(f"# Mutation check\n\n`{cmd}` ({summary}). Tests run, one thread, stopping at the first "
                    f"failure:\n`{' '.join(tests)}`.\n\n{ABOUT}\n\n{table}\n")


if __name__ == "__main__":
    main()
