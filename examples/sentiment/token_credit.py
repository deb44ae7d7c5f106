"""examples/sentiment/token_credit.py — does a value model's per-token credit land on the words that carry
the reward? The gold reward here is a lexicon (VADER), so the true credit of every word is known.

  python examples/sentiment/token_credit.py --gvm out/sentiment/gvm --rm out/sentiment/rm
      -> out/sentiment/token_credit.json, docs/sentiment_token_credit.png, docs/sentiment_credit_vs_valence.png

  1. Responses: both replies of every held-out pair (gold_pairs.jsonl, split "eval"), encoded exactly as
     gvm.py and reward_model.py encode them (data.encode_prompt: chat template; data.encode_response:
     the reply's tokens + <|im_end|>).
  2. Chain: w_0..w_T of each value model on x ⊕ y (model.value_chain; evaluation.explain prints the same);
     credit of token t: Δw_t = w_t - w_{t-1}, t = 1..T-1. The end-of-turn token T completes no word and
     is left out.
  3. Words: VADER's words (whitespace-separated, leading/trailing punctuation stripped: reward.vader_word),
     each with its lexicon valence v in [-4, 4] (0 outside the lexicon). Tokens are mapped to words by the
     tokenizer's character offsets. Two rules give each token a valence:
       "last": the token that holds a word's last character carries v; every other token 0;
       "all":  every token that overlaps a word carries its v.
     And one rule-free view, "word": the credit of a word is the sum of Δw_t over its tokens.
  4. Pearson and Spearman correlations of credit and valence over all response tokens (words), and over
     the tokens (words) of lexicon words only (v != 0), for the GVM and for the RM. The RM is trained at
     the last token only, so its per-prefix values are whatever the backbone makes of a prefix: the contrast.
     With --critic, also a PPO critic after training (GAE targets on the RM's reward, on its own policy).
  5. Per response: Spearman of the terminal value w_T with the gold score, and pairwise accuracy against
     the noisy labels (gvm.py's number) and against the gold order (gold ties left out).
  6. Pictures: two held-out replies (the most positive and the most negative by gold, or --examples) with
     tokens coloured by Δw_t, GVM and RM side by side; word credit against valence.
"""
from __future__ import annotations

import json
import math
import os
import re
import string
import sys
from dataclasses import dataclass

import matplotlib
import torch

matplotlib.use("Agg")  # files only: no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo's model.py / data.py, from any working directory
import data  # noqa: E402
import evaluation  # noqa: E402
import fsdp_utils as fu  # noqa: E402
import model  # noqa: E402
import train_utils as tu  # noqa: E402
from examples.sentiment.reward import valence, vader_word  # noqa: E402

CONFIGS = {"GVM": ("gvm_config.json", "train one with `python gvm.py`"),
           "RM": ("rm_config.json", "train one with `python reward_model.py`"),
           "critic": ("critic_config.json", "train PPO with `python ppo_baseline.py` (its out_dir/critic)")}


@dataclass
class Config:
    gvm: str = "out/sentiment/gvm"  # a trained GVM folder (gvm.py)
    rm: str = "out/sentiment/rm"  # a trained reward model folder (reward_model.py); empty = none
    critic: str = ""  # a trained PPO critic (ppo_baseline.py's out_dir/critic); empty = none
    data: str = "out/sentiment/gold_pairs.jsonl"  # make_data.py's pairs with their gold scores
    split: str = "eval"  # which pairs' replies to read: eval (held out) or train
    out: str = "out/sentiment/token_credit.json"
    figure: str = "docs/sentiment_token_credit.png"  # tokens coloured by Δw_t; empty = no pictures
    scatter: str = "docs/sentiment_credit_vs_valence.png"  # word credit against valence; empty = none
    examples: str = ""  # comma-separated indices of the replies to draw; empty = the most positive and negative
    batch_size: int = 16  # replies per forward
    device: str = "auto"


# ----------------------------------------------------------------------------------------------
# Pure functions: words, token valences, correlations

def word_spans(text: str) -> list[tuple[int, int, float]]:
    """VADER's words of `text` as (start, end, valence): character spans of the whitespace-separated
    tokens with the punctuation VADER strips (reward.vader_word) left out of the span."""
    out = []
    for m in re.finditer(r"\S+", text):
        raw, word = m.group(), vader_word(m.group())
        lead = len(raw) - len(raw.lstrip(string.punctuation)) if word != raw else 0
        out.append((m.start() + lead, m.start() + lead + len(word), valence(raw)))
    return out


def token_words(offsets: list[tuple[int, int]], spans: list[tuple[int, int, float]]) -> list[list[int]]:
    """For each word span (W of them), the indices of the tokens (offsets: (T,) character spans) that
    overlap it, in order. A token can overlap two words only if it holds a space inside it."""
    out = []
    for s, e, _ in spans:
        out.append([t for t, (ts, te) in enumerate(offsets) if ts < e and te > s and te > ts])
    return out


def token_valence(n_tokens: int, spans: list[tuple[int, int, float]], members: list[list[int]],
                  rule: str) -> list[float]:
    """Valence of each of n_tokens tokens (T,): rule "last" gives a word's valence to the last token that
    overlaps it, "all" to every such token (a token in two words keeps the larger |v|); others get 0."""
    v = [0.0] * n_tokens
    for (_, _, val), toks in zip(spans, members):
        for t in (toks[-1:] if rule == "last" else toks):
            if abs(val) > abs(v[t]):
                v[t] = val
    return v


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (N,); nan when either is constant or N < 2."""
    if len(a) < 2:
        return float("nan")
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def correlations(credit: torch.Tensor, val: torch.Tensor) -> dict:
    """Pearson and Spearman of credit and valence (N,), over all entries and over entries with v != 0."""
    lex = val != 0
    return {"n": len(val), "pearson": pearson(credit, val), "spearman": evaluation.rank_correlation(credit, val),
            "n_lexicon": int(lex.sum()), "pearson_lexicon": pearson(credit[lex], val[lex]),
            "spearman_lexicon": evaluation.rank_correlation(credit[lex], val[lex])}


# ----------------------------------------------------------------------------------------------
# Reading the chains

@torch.no_grad()
def chains(value_model, tok, replies: list[dict], batch_size: int, device) -> list[list[float]]:
    """The chain w_0..w_T of every reply ({prompt, text}) as training encodes it."""
    out = []
    for i in range(0, len(replies), batch_size):
        chunk = replies[i:i + batch_size]
        batch = data.collate_right([data.encode_prompt(tok, r["prompt"]) for r in chunk],
                                   [data.encode_response(tok, r["text"]) for r in chunk], tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        u = value_model(batch["input_ids"], batch["attention_mask"]).float()  # (B, L)
        w, _ = model.value_chain(u, batch["prompt_len"], batch["response_len"])  # (B, T+1)
        out += [w[b, :n + 1].tolist() for b, n in enumerate(batch["response_len"].tolist())]
    return out


def reply_tokens(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The reply's token ids (without the end-of-turn token) and their character offsets, checked to
    be the ids data.encode_response trains on."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != data.encode_response(tok, text)[:-1]:
        raise data.DataError("the tokenizer's offsets do not match data.encode_response's ids")
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


# ----------------------------------------------------------------------------------------------
# Pictures

def draw_reply(ax, pieces: list[str], credit: list[float], lexicon: list[bool], scale: float, title: str,
               fontsize: float = 10.0):
    """Tokens (`pieces`, the reply's text cut at token boundaries) laid out left to right and wrapped,
    each on a background coloured by its credit / scale (red < 0 < blue); tokens of lexicon words bold."""
    ax.set_axis_off()
    ax.set_title(title, fontsize=fontsize + 1, loc="left")
    cmap = plt.get_cmap("RdBu")
    width_pt = ax.get_position().width * ax.figure.get_figwidth() * 72
    height_pt = ax.get_position().height * ax.figure.get_figheight() * 72
    char_w, line_h = 0.61 * fontsize / width_pt, 1.9 * fontsize / height_pt  # monospace advance, line pitch
    x, y = 0.0, 1.0
    for piece, c, lex in zip(pieces, credit, lexicon):
        piece = piece.replace("\n", "⏎")
        if x + len(piece) * char_w > 1.0 and x > 0:
            x, y = 0.0, y - line_h
            piece = piece.lstrip(" ")
        ax.text(x, y, piece, family="monospace", fontsize=fontsize, va="top", ha="left",
                fontweight="bold" if lex else "normal",
                bbox=dict(boxstyle="square,pad=0.05", fc=cmap(0.5 + 0.5 * max(-1.0, min(1.0, c / scale))), ec="none"))
        x += len(piece) * char_w


def token_picture(path: str, shown: list[dict], names: list[str]):
    """One row per shown reply, one column per model: tokens coloured by Δw_t (each model's own scale:
    its largest |Δw_t| over the shown replies), and a colour bar per column."""
    fig, axes = plt.subplots(len(shown), len(names), figsize=(7.2 * len(names), 2.6 * len(shown) + 0.9),
                             squeeze=False)
    for j, name in enumerate(names):
        scale = max(abs(c) for s in shown for c in s["credit"][name]) or 1.0
        for i, s in enumerate(shown):
            title = (f"{name}: Δw_t   (w_0 {s['w0'][name]:+.2f} → w_T {s['wT'][name]:+.2f}; "
                     f"gold VADER {s['gold']:+.2f})")
            draw_reply(axes[i, j], s["pieces"], s["credit"][name], s["lexicon"], scale, title)
        sm = plt.cm.ScalarMappable(cmap="RdBu", norm=plt.Normalize(-scale, scale))
        fig.colorbar(sm, ax=list(axes[:, j]), orientation="horizontal", fraction=0.05, pad=0.02,
                     label=f"{name} Δw_t = w_t − w_(t−1)")
    fig.suptitle("Per-token value increments on held-out replies (bold: VADER lexicon words; ⏎ newline)",
                 fontsize=12)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def scatter_picture(path: str, words: dict, names: list[str]):
    """Word credit (Σ Δw_t over the word's tokens) against lexicon valence, lexicon words only, one
    panel per model, with the mean credit per valence bin."""
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        v, c = words["valence"], words["credit"][name]
        lex = v != 0
        ax.scatter(v[lex], c[lex], s=8, alpha=0.35, color="tab:blue", label="a lexicon word")
        edges = torch.tensor([-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.01])
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = lex & (v >= lo) & (v < hi)
            if sel.sum() >= 3:
                m, se = c[sel].mean().item(), (c[sel].std() / math.sqrt(int(sel.sum()))).item()
                ax.errorbar([(lo + hi).item() / 2], [m], yerr=[se], fmt="o", color="black", capsize=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("VADER lexicon valence of the word")
        ax.set_ylabel("word credit Σ Δw_t")
        r = evaluation.rank_correlation(c[lex], v[lex])
        ax.set_title(f"{name}: Spearman {r:+.2f} over {int(lex.sum())} lexicon words")
    axes[0, 0].errorbar([], [], yerr=[], fmt="o", color="black", label="bin mean ± s.e.")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# main

def main(cfg: Config):
    device = fu.setup(cfg.device)
    rows = [r for r in (json.loads(line) for line in open(cfg.data)) if r["split"] == cfg.split]
    if not rows:
        raise data.DataError(f"{cfg.data}: no pairs in split {cfg.split!r}")
    replies = [{"prompt": r["prompt"], "text": r[k], "gold": r[f"gold_{k}"]}
               for r in rows for k in ("chosen", "rejected")]  # alternating: 0::2 chosen, 1::2 rejected
    paths = {"GVM": cfg.gvm, "RM": cfg.rm, "critic": cfg.critic}
    names = [n for n in ("GVM", "RM", "critic") if paths[n]]
    w, tok = {}, None
    for name in names:
        vm, tok, _ = model.load_value_model(paths[name], *CONFIGS[name], device, frozen=True)
        w[name] = chains(vm, tok, replies, cfg.batch_size, device)
        del vm
    # per-token and per-word credit vs valence
    tokens = {"last": [], "all": []}
    credit = {n: [] for n in names}
    words = {"valence": [], "credit": {n: [] for n in names}}
    for i, r in enumerate(replies):
        ids, offsets = reply_tokens(tok, r["text"])
        spans = word_spans(r["text"])
        members = token_words(offsets, spans)
        r["pieces"] = [r["text"][s:e] for s, e in offsets]
        r["lexicon"] = token_valence(len(ids), spans, members, "all")
        for rule in tokens:
            tokens[rule] += token_valence(len(ids), spans, members, rule)
        r["credit"] = {n: [w[n][i][t + 1] - w[n][i][t] for t in range(len(ids))] for n in names}  # Δw_1..Δw_{T-1}
        for n in names:
            credit[n] += r["credit"][n]
        for (_, _, v), toks in zip(spans, members):
            if toks:
                words["valence"].append(v)
                for n in names:
                    words["credit"][n].append(sum(r["credit"][n][t] for t in toks))
    val = {rule: torch.tensor(v) for rule, v in tokens.items()}
    words["valence"] = torch.tensor(words["valence"])
    words["credit"] = {n: torch.tensor(c) for n, c in words["credit"].items()}
    gold = torch.tensor([r["gold"] for r in replies])
    result = {"split": cfg.split, "replies": len(replies), "pairs": len(rows), "models": paths}
    for n in names:
        c = torch.tensor(credit[n])
        wT = torch.tensor([ch[-1] for ch in w[n]])
        differ = gold[0::2] != gold[1::2]
        result[n] = {"token_last": correlations(c, val["last"]), "token_all": correlations(c, val["all"]),
                     "word": correlations(words["credit"][n], words["valence"]),
                     "terminal_vs_gold_spearman": evaluation.rank_correlation(wT, gold),
                     "pairwise_accuracy_labels": evaluation.pairwise_accuracy(wT[0::2], wT[1::2]),
                     "pairwise_accuracy_gold_order": evaluation.pairwise_accuracy(
                         torch.where(gold[0::2] > gold[1::2], wT[0::2], wT[1::2])[differ],
                         torch.where(gold[0::2] > gold[1::2], wT[1::2], wT[0::2])[differ]),
                     "gold_order_pairs": int(differ.sum()), "delta_w_sd": c.std().item()}
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{len(replies)} {cfg.split} replies, {len(val['last'])} tokens, {int((val['all'] != 0).sum())} of them "
          f"in lexicon words ({int((words['valence'] != 0).sum())} words)")
    print(f"{'model':<5} {'view':<11} {'Pearson':>8} {'Spearman':>9} {'Pearson lex':>12} {'Spearman lex':>13}")
    for n in names:
        for view in ("token_last", "token_all", "word"):
            s = result[n][view]
            print(f"{n:<5} {view:<11} {s['pearson']:>+8.3f} {s['spearman']:>+9.3f} {s['pearson_lexicon']:>+12.3f} "
                  f"{s['spearman_lexicon']:>+13.3f}")
        print(f"{n:<5} terminal w_T vs gold: Spearman {result[n]['terminal_vs_gold_spearman']:+.3f}; pairwise accuracy "
              f"{result[n]['pairwise_accuracy_labels']:.3f} (labels), {result[n]['pairwise_accuracy_gold_order']:.3f} "
              f"(gold order, {result[n]['gold_order_pairs']} pairs)")
    print(f"wrote {cfg.out}")
    if cfg.figure:
        picks = ([int(i) for i in cfg.examples.split(",")] if cfg.examples else
                 [int(gold.argmax()), int(gold.argmin())])
        shown = [{"pieces": replies[i]["pieces"], "credit": replies[i]["credit"], "lexicon":
                  [v != 0 for v in replies[i]["lexicon"]], "gold": replies[i]["gold"],
                  "w0": {n: w[n][i][0] for n in names}, "wT": {n: w[n][i][-1] for n in names}} for i in picks]
        token_picture(cfg.figure, shown, names)
        print(f"wrote {cfg.figure} (replies {picks})")
    if cfg.scatter:
        scatter_picture(cfg.scatter, words, names)
        print(f"wrote {cfg.scatter}")
    return result


if __name__ == "__main__":
    try:
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError, FileNotFoundError) as e:  # bad input or flag: one line, no traceback
        sys.exit(f"token_credit.py: {e}")
