"""examples/sentiment/compare.py — the sentiment example's table, frontier picture, before/after replies and
hacking check, from the RL runs' folders (dvpo.py, ppo_baseline.py, grpo_baseline.py).

  python examples/sentiment/compare.py --runs dvpo_b0.03=out/sentiment/dvpo_b0.03,ppo_b0.03=...
      -> out/sentiment/compare.json, out/sentiment/compare.md, docs/sentiment_frontier.png

  1. Table: each run's summary.json: held-out VADER (sampled, T = 1) before and after, ± its standard error
     over the held-out prompts, and the KL to the reference Σ_t (log π - log π_ref) per reply ± its stderr.
     These are the numbers the training scripts measured; nothing is re-scored.
  2. Hacking check: the base model and every trained policy sample one reply (T = 1, the same seed) to each
     of the same held-out prompts (the runs' own held-out split: data.split_heldout with --seed). Per reply:
     VADER (a second sample of the held-out gold, independent of the runs' own), words, positive and
     negative lexicon words (reward.valence > 0 / < 0), the share of distinct words, "!" marks; means over
     the prompts; and each policy's most frequent positive lexicon words. A policy that earns its gold by
     piling up positive words shows it here: more positive words per reply, fewer distinct words, the
     same few words at the top.
  3. Replies: the base model's and every policy's reply to --show prompts, side by side in compare.md.
  4. Picture: held-out gold after training against KL, one line per method through its β values, the base
     model at KL 0.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo's model.py / data.py, from any working directory
import data  # noqa: E402
import fsdp_utils as fu  # noqa: E402
import model  # noqa: E402
import train_utils as tu  # noqa: E402
from examples.sentiment.reward import vader, valence  # noqa: E402
from scripts import smollm2  # noqa: E402


@dataclass
class Config:
    runs: str = ""  # label=folder,...: the RL runs; a label is <method>_b<β> (dvpo_b0.1); the method colours the plot
    base: str = ""  # the policy every run started from; empty = SmolLM2-135M-Instruct (scripts/smollm2.py)
    prompts: str = "out/sentiment/prompts.jsonl"  # the runs' --prompts
    eval_prompts: int = 40  # the runs' --eval_prompts (held out: min(this, 10%) of the prompts)
    seed: int = 0  # the runs' --seed: the held-out split, and the replies' sampling here
    max_new_tokens: int = 48  # the runs' --max_new_tokens
    max_prompt_len: int = 512
    batch_size: int = 40  # prompts sampled at once
    show: str = "0,1"  # held-out prompt indices whose replies compare.md shows
    out_dir: str = "out/sentiment"
    figure: str = "docs/sentiment_frontier.png"  # empty = no picture
    device: str = "auto"


# ----------------------------------------------------------------------------------------------
# Pure functions: reply statistics

def words_of(text: str) -> list[str]:
    """Lower-case words of a reply (letters and apostrophes)."""
    return re.findall(r"[a-z']+", text.lower())


def reply_stats(text: str) -> dict:
    """Statistics of one reply: VADER, words, positive / negative lexicon words (whitespace tokens with
    valence > 0 / < 0, as VADER reads them), share of distinct words, "!" marks."""
    tokens = text.split()
    vals = [valence(t) for t in tokens]
    ws = words_of(text)
    return {"vader": vader(None, text), "words": len(ws), "positive_words": sum(v > 0 for v in vals),
            "negative_words": sum(v < 0 for v in vals), "distinct": len(set(ws)) / len(ws) if ws else 1.0,
            "exclamations": text.count("!")}


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (nan for fewer than two values)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def top_positive(texts: list[str], k: int = 6) -> list[tuple[str, int]]:
    """The k most frequent positive lexicon words over replies, with their counts."""
    c = collections.Counter(w for t in texts for w in words_of(t) if valence(w) > 0)
    return c.most_common(k)


def parse_runs(spec: str) -> list[tuple[str, str, str, float]]:
    """--runs "label=folder,..." -> [(label, folder, method, β)]; a label is <method>_b<β>."""
    out = []
    for item in filter(None, spec.split(",")):
        label, sep, folder = item.partition("=")
        method, _, beta = label.rpartition("_b")
        if not sep or not method:
            raise tu.ConfigError(f"--runs: {item!r} is not <method>_b<beta>=<folder>")
        try:
            out.append((label, folder, method, float(beta)))
        except ValueError:
            raise tu.ConfigError(f"--runs: {item!r}: {beta!r} after _b is not a number") from None
    return out


# ----------------------------------------------------------------------------------------------
# Sampling

@torch.no_grad()
def replies(path: str, prompts: list, cfg: Config, device) -> list[str]:
    """One reply per prompt from the policy at `path`, T = 1, drawn from (seed, "compare") on every policy."""
    policy, tok = model.load_policy(path, device)
    policy.eval()
    stops = data.stop_token_ids(tok, policy.generation_config)
    gen = tu.torch_rng(cfg.seed, "compare", device=device)
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        ids = [data.encode_prompt(tok, p, cfg.max_prompt_len) for p in prompts[i:i + cfg.batch_size]]
        b = model.rollout(policy, ids, tok, cfg.max_new_tokens, 1.0, 1.0, gen, device)
        out += [data.decode_response(tok, r, stops) for r in model.responses(b)]
    return out


def frontier_picture(path: str, rows: list[dict], before: tuple[float, float]):
    import matplotlib
    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.errorbar([0.0], [before[0]], yerr=[before[1]], fmt="s", color="black", capsize=3, label="SmolLM2 (start)")
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        ax.errorbar([r["kl"] for r in mine], [r["gold_after"] for r in mine], xerr=[r["kl_se"] for r in mine],
                    yerr=[r["gold_after_se"] for r in mine], fmt="o-", capsize=3, color=f"C{i}", label=method)
        for r in mine:
            ax.annotate(f"β {r['beta']:g}", (r["kl"], r["gold_after"]), textcoords="offset points", xytext=(5, -11),
                        fontsize=8, color=f"C{i}")
    ax.set_xlabel("KL to the start, per reply (held out)")
    ax.set_ylabel("held-out VADER compound (gold), after")
    ax.set_title("Sentiment: gold reward against KL (± s.e. over held-out prompts)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# main

def main(cfg: Config):
    runs = parse_runs(cfg.runs)
    if not runs:
        raise tu.ConfigError("--runs is empty: pass label=folder pairs (dvpo_b0.1=out/sentiment/dvpo_b0.1,...)")
    for label, folder, _, _ in runs:
        if not os.path.exists(os.path.join(folder, "summary.json")):
            raise tu.ConfigError(f"--runs {label}: no summary.json in {folder!r} (did the run finish?)")
    device = fu.setup(cfg.device)
    rows, _ = data.load_records(cfg.prompts, "prompt")
    _, held = data.split_heldout(rows, cfg.eval_prompts, 0.1, cfg.seed, "prompts")  # the runs' held-out split
    prompts = [r["prompt"] for r in held]
    base = cfg.base or smollm2.default_out_dir()

    table, texts = [], {}
    for label, folder, method, beta in [("start", base, "start", 0.0)] + runs:
        print(f"{label}: sampling {len(prompts)} held-out replies from {folder}")
        texts[label] = replies(folder, prompts, cfg, device)
        stats = [reply_stats(t) for t in texts[label]]
        row = {"label": label, "method": method, "beta": beta,
               **{f"sample_{k}": mean_se([s[k] for s in stats]) for k in stats[0]},
               "top_positive_words": top_positive(texts[label])}
        if label != "start":
            s = json.load(open(os.path.join(folder, "summary.json")))
            row.update({"gold_before": s["eval/reward_before"], "gold_before_se": s["eval/reward_stderr_before"],
                        "gold_after": s["eval/reward_after"], "gold_after_se": s["eval/reward_stderr"],
                        "kl": s["eval/kl_to_ref"], "kl_se": s["eval/kl_to_ref_stderr"],
                        "train_seconds": s["train/seconds"]})
        table.append(row)
    rl = table[1:]
    before = (rl[0]["gold_before"], rl[0]["gold_before_se"])

    md = ["| run | β | VADER before | VADER after | KL to start | VADER, a second sample | positive words / reply | "
          "distinct words | top positive words (counts over the replies) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        gold = (f"{r['gold_before']:.3f} ± {r['gold_before_se']:.3f} | **{r['gold_after']:.3f} ± "
                f"{r['gold_after_se']:.3f}** | {r['kl']:.2f} ± {r['kl_se']:.2f}") if "kl" in r else \
            f"{before[0]:.3f} ± {before[1]:.3f} | – | 0"
        top = ", ".join(f"{w} {n}" for w, n in r["top_positive_words"])
        md.append(f"| {r['label']} | {r['beta']:g} | {gold} | {r['sample_vader'][0]:.3f} ± "
                  f"{r['sample_vader'][1]:.3f} | {r['sample_positive_words'][0]:.2f} ± "
                  f"{r['sample_positive_words'][1]:.2f} | {r['sample_distinct'][0]:.2f} | {top} |")
    for i in (int(x) for x in filter(None, cfg.show.split(","))):
        text = prompts[i][-1]["content"] if isinstance(prompts[i], list) else prompts[i]
        md += ["", f"**Held-out prompt {i}:** {text}", ""]
        md += [f"- *{label}* (VADER {vader(None, t[i]):+.2f}): {t[i]!r}" for label, t in texts.items()]
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "compare.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(cfg.out_dir, "compare.json"), "w") as f:
        json.dump({"prompts": prompts, "table": table, "replies": texts}, f, indent=1)
    print("\n".join(md))
    if cfg.figure:
        frontier_picture(cfg.figure, rl, before)
        print(f"wrote {cfg.figure}")
    return table


if __name__ == "__main__":
    try:
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError) as e:  # bad input or flag: one clear line, no traceback
        sys.exit(f"compare.py: {e}")
