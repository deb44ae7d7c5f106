"""examples/arithmetic/make_data.py — data for a real run: two-digit additions answered by
SmolLM2-135M-Instruct, in the formats the scripts read (chat messages; docs in README.md here).

  python examples/arithmetic/make_data.py --out_dir out/arithmetic
      sft.jsonl      {messages: [system, user, assistant]}: questions with their correct answer
      prompts.jsonl  {messages: [system, user]}: other questions, for DVPO / PPO (10% held out by them)
  python examples/arithmetic/make_data.py --pairs --model out/arithmetic/sft --out_dir out/arithmetic
      prefs.jsonl    {prompt, chosen, rejected} in UltraFeedback's chat form ({chosen: [user..., assistant]}):
                     --samples answers per question sampled from --model at temperature 1 and labelled by
                     exact match (reward.py: a verifiable reward, no external labeller); one pair per
                     question with at least one right and one wrong answer (the first of each); questions
                     whose answers are all right or all wrong (ties) give no pair and are counted.

Questions are "What is a + b?" with a, b uniform in [0, 99]; the three files use disjoint questions
(split by a hash of the question), and every draw comes from --seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo's model.py / train_utils.py, from any working directory
import model  # noqa: E402
import train_utils as tu  # noqa: E402
from examples.arithmetic.reward import exact_match  # noqa: E402

SYSTEM = "Answer with the number only."


@dataclass
class Config:
    out_dir: str = "out/arithmetic"
    n_sft: int = 1024  # SFT demonstrations (sft.py holds out min(--eval_size, 10%) of them)
    n_prompts: int = 1000  # RL prompts (dvpo.py / ppo_baseline.py hold out min(--eval_prompts, 10%) of them)
    n_pair_questions: int = 256  # questions sampled for preference pairs
    pairs: bool = False  # write prefs.jsonl from --model's samples instead of sft.jsonl / prompts.jsonl
    model: str = "out/arithmetic/sft"  # --pairs: the policy whose answers are labelled (the SFT model)
    samples: int = 4  # --pairs: answers per question
    max_new_tokens: int = 8
    seed: int = 0


def split_of(a: int, b: int) -> str:
    """Each question belongs to one file: sft, prompts or pairs (by a hash, so sets never overlap)."""
    return ("sft", "prompts", "pairs")[hashlib.sha256(f"{a}+{b}".encode()).digest()[0] % 3]


def questions(n: int, split: str, seed: int) -> list[tuple[int, int]]:
    rng, out, seen = random.Random(f"arithmetic-{split}-{seed}"), [], set()
    while len(out) < n:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if split_of(a, b) == split and (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def chat(a: int, b: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]


def write_jsonl(path: str, rows: list[dict]):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} records to {path}")


def make_pairs(cfg: Config):
    policy, tok = model.load_policy(cfg.model)
    policy.eval()
    qs = questions(cfg.n_pair_questions, "pairs", cfg.seed)
    prompts = [chat(a, b) for a, b in qs]
    gen = tu.torch_rng(cfg.seed, "arithmetic/pairs")
    answers = [model.sample_texts(policy, tok, prompts, cfg.max_new_tokens, 1.0, 1.0, 128, gen)
               for _ in range(cfg.samples)]
    rows, ties = [], {"all right": 0, "all wrong": 0}
    for i, p in enumerate(prompts):
        ys = [a[i] for a in answers]
        right = [y for y in ys if exact_match(p, y)]
        wrong = [y for y in ys if not exact_match(p, y) and y.strip()]
        if right and wrong:
            rows.append({"prompt": p, "chosen": p + [{"role": "assistant", "content": right[0]}],
                         "rejected": p + [{"role": "assistant", "content": wrong[0]}], "policy": "sft"})
        else:
            ties["all right" if right else "all wrong"] += 1
    acc = sum(exact_match(p, a[i]) for a in answers for i, p in enumerate(prompts)) / (len(prompts) * cfg.samples)
    print(f"{cfg.model}: exact match of samples {acc:.3f}; {len(rows)} pairs from {len(prompts)} questions "
          f"(no pair: {ties['all right']} all right, {ties['all wrong']} all wrong or empty)")
    write_jsonl(os.path.join(cfg.out_dir, "prefs.jsonl"), rows)


def main(cfg: Config):
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.pairs:
        return make_pairs(cfg)
    write_jsonl(os.path.join(cfg.out_dir, "sft.jsonl"),
                [{"messages": chat(a, b) + [{"role": "assistant", "content": str(a + b)}]}
                 for a, b in questions(cfg.n_sft, "sft", cfg.seed)])
    write_jsonl(os.path.join(cfg.out_dir, "prompts.jsonl"),
                [{"messages": chat(a, b)} for a, b in questions(cfg.n_prompts, "prompts", cfg.seed)])


if __name__ == "__main__":
    main(tu.parse_config(Config))
