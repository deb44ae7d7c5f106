"""examples/sentiment/reward.py — the hidden gold reward of the sentiment example: VADER.

    vader(prompt, response) = VADER's compound score of the response, in [-1, 1]: the sum s of its
                              words' lexicon valences (each in [-4, 4], adjusted for negation, boosters
                              such as "very", ALL CAPS, "but" and exclamation marks), squashed by
                              s / sqrt(s² + 15). The prompt is ignored.
    valence(word)           = the raw lexicon valence of one word, in [-4, 4], 0 for a word outside the
                              lexicon: the true credit of a word (token_credit.py compares a value
                              model's per-token increments with it).

For `--eval_reward examples.sentiment.reward:vader` (dvpo.py, ppo_baseline.py; run from the repo root):
it scores held-out responses before and after training and never enters a loss. make_data.py uses it
to label the preference pairs (through Bradley-Terry noise; the training files never carry the score).

VADER (Hutto & Gilbert 2014) is a lexicon of ~7,500 words and emoticons rated by people, shipped inside
the `vaderSentiment` wheel (MIT): no download, no model, deterministic. A development / example
dependency only (requirements-dev.txt); no top-level script imports it.
"""
from __future__ import annotations

import string

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

ANALYZER = SentimentIntensityAnalyzer()  # reads the lexicon once (~7,500 entries)


def vader(prompt, response: str) -> float:
    """VADER compound score of `response` in [-1, 1] (`prompt`, a string or chat messages, is unused)."""
    return float(ANALYZER.polarity_scores(response)["compound"])


def vader_word(token: str) -> str:
    """The word VADER looks up for one whitespace-separated token: leading and trailing punctuation
    stripped unless that leaves two characters or fewer (then it is kept whole, as an emoticon)."""
    stripped = token.strip(string.punctuation)
    return token if len(stripped) <= 2 else stripped


def valence(word: str) -> float:
    """Lexicon valence of a whitespace-separated token (VADER's lookup: vader_word, lower-cased), in
    [-4, 4]; 0.0 when the word is not in the lexicon. Context rules (negation, boosters) are not applied."""
    return float(ANALYZER.lexicon.get(vader_word(word).lower(), 0.0))
