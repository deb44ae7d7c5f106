"""examples/arithmetic/reward.py — the evaluation reward of the arithmetic example: exact match.

    exact_match(prompt, response) = 1.0 if the response, stripped of surrounding whitespace, is the
                                    question's answer written as digits, else 0.0

For `--eval_reward examples.arithmetic.reward:exact_match` (sft.py, dvpo.py, ppo_baseline.py; run
from the repo root). It scores held-out responses before and after training and is logged as
`reward` per step; it never enters a loss. make_data.py uses it to label preference pairs.
"""
from __future__ import annotations

import re

QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


def answer(prompt) -> int:
    """The sum asked for in a prompt: a string, or chat messages whose last user turn asks it."""
    text = prompt if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"][-1]
    m = QUESTION.search(text)
    if m is None:
        raise ValueError(f"not an arithmetic question: {text!r}")
    return int(m.group(1)) + int(m.group(2))


def exact_match(prompt, response: str) -> float:
    return float(response.strip() == str(answer(prompt)))
