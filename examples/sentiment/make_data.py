"""examples/sentiment/make_data.py — data for the sentiment example: neutral chat prompts, pairs of
SmolLM2-135M-Instruct's own replies, labelled by a hidden gold reward (VADER, reward.py) through
Bradley-Terry noise. The training files never carry a score.

  python examples/sentiment/make_data.py --out_dir out/sentiment
      prompts.jsonl     {messages}: RL prompts for dvpo.py / ppo_baseline.py (which hold out 10% of them)
      prefs.jsonl       {prompt, chosen, rejected, policy} in UltraFeedback's chat form ({chosen: [user...,
                        assistant]}): the value models' training pairs
      prefs_eval.jsonl  the same on held-out topics: the value models' held-out pairs (--eval_data)
      gold_pairs.jsonl  every pair with its split and gold scores (analysis only: no script trains on it)
      data_stats.json   what was measured: VADER's distribution, the labels' own accuracy, sampling speed

  1. Prompts: TEMPLATES x TOPICS written here (places, objects, errands: mundane on purpose, so that the
     gold reward has room to move either way), 9 templates per topic. Each topic belongs to one split by
     a hash of its name: "train" (pairs), "eval" (held-out pairs) or "rl" (RL prompts), so a held-out
     prompt's topic was never in a training pair, and RL prompts share no topic with either.
  2. Responses: --samples replies per pair prompt from --model (chat template, temperature 1, at most
     --max_new_tokens tokens, a reply cut there keeps its text), sampled with a KV cache (model.rollout).
  3. Gold: g = VADER compound of the reply, in [-1, 1].
  4. Labels: consecutive replies of a prompt form a pair (a, b); a is chosen with probability
     σ((g_a - g_b) / t), t = --bt_temperature (the built-in task's Bradley-Terry noise). A pair whose two
     replies are identical, or one empty, is dropped and counted.
Every random draw (prompt order, sampling, labels) comes from --seed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo's model.py / data.py, from any working directory
import data  # noqa: E402
import fsdp_utils as fu  # noqa: E402
import model  # noqa: E402
import train_utils as tu  # noqa: E402
from examples.sentiment.reward import vader  # noqa: E402
from scripts import smollm2  # noqa: E402

# Topics with their article, so every template reads as English. Nothing here is an opinion.
PLACES = [
    "a post office", "a laundromat", "a bus station", "a public library", "a hardware store", "a parking garage",
    "a train platform", "a dentist's waiting room", "a county clerk's office", "a supermarket", "a gas station",
    "a warehouse", "an airport baggage claim area", "a city hall", "a print shop", "a bank branch",
    "a self-storage facility", "a recycling center", "a school cafeteria", "an office break room",
    "a shoe repair shop", "a pharmacy", "a car wash", "a fire station", "a tax office", "a hotel lobby",
    "an apartment building lobby", "a ferry terminal", "a courthouse", "a driving test center", "a furniture store",
    "a bicycle shop", "a university registrar's office", "a highway rest stop", "a train ticket office",
    "a parking lot", "a water treatment plant", "a mail sorting room", "a stationery store", "a tire shop",
    "a copy center", "a bus depot", "a community center", "a township records office", "a grain elevator",
    "a loading dock", "a freight yard", "a municipal archive", "a motor vehicle office", "a key cutting kiosk",
]
OBJECTS = [
    "a stapler", "a filing cabinet", "a parking meter", "a paper clip", "a desk lamp", "a ceiling fan",
    "a ballpoint pen", "a tape measure", "a traffic cone", "a water meter", "a pocket calculator", "an envelope",
    "a door hinge", "a light switch", "a shopping cart", "an umbrella stand", "a clipboard", "an extension cord",
    "a mailbox", "a thermostat", "a hole punch", "a rubber band", "a coat hanger", "a kitchen timer", "a padlock",
    "a ticket machine", "a vending machine", "a photocopier", "a postage stamp", "a wall clock", "a garden hose",
    "a step ladder", "a fire extinguisher", "a power strip", "a mop bucket", "a dish rack", "a shoelace",
    "a bookshelf", "a file folder", "a barcode scanner", "a price tag", "a doorstop", "an ice cube tray",
    "a pencil sharpener", "a tape dispenser", "an electricity meter", "a manhole cover", "a revolving door",
    "a paper shredder", "a bus shelter",
]
ERRANDS = [
    "renewing a library card", "sorting mail", "changing a light bulb", "filling out a change-of-address form",
    "reading a water meter", "restocking supermarket shelves", "paying a parking fee", "boarding a city bus",
    "doing laundry at a laundromat", "filing paperwork", "taking inventory in a warehouse", "registering a car",
    "applying for a passport", "mailing a package", "replacing a printer cartridge", "defrosting a freezer",
    "scheduling a meeting", "alphabetizing a bookshelf", "measuring a room", "repotting a houseplant",
    "labeling storage boxes", "sweeping a floor", "ironing a shirt", "returning a library book",
    "updating a phone's software", "backing up computer files", "checking tire pressure", "flattening cardboard boxes",
    "loading a dishwasher", "assembling a flat-pack shelf", "counting the cash drawer at the end of a shift",
    "taking the minutes of a meeting", "transferring money between accounts", "renewing a driver's license",
    "shipping a parcel overseas", "weighing letters at a post office", "setting a thermostat", "cleaning a window",
    "folding towels", "packing a lunch", "watering a lawn", "reading a bus timetable", "filing a tax return",
    "unclogging a sink", "painting a fence", "shelving returned books", "cataloguing a stamp collection",
    "sorting recycling", "programming a microwave", "replacing a bicycle chain",
]
TEMPLATES = {
    "place": ["Describe a typical Tuesday at {x}.", "What does {x} look like early in the morning?",
              "Describe the sounds you might hear in {x}.", "Explain what people usually do at {x}.",
              "Write a short description of {x}.", "Describe the layout of {x}.",
              "What kinds of jobs are done at {x}?", "Describe {x} in the late afternoon.",
              "What would a visitor notice first at {x}?"],
    "object": ["Explain how {x} works.", "Describe what {x} is made of.", "Write a short paragraph about {x}.",
               "What is {x} used for?", "Describe the parts of {x}.", "How is {x} usually made?",
               "Give a plain description of {x}.", "Where would you usually find {x}?",
               "Describe {x} to someone who has never seen one."],
    "errand": ["Explain the steps of {x}.", "Describe {x}.", "What is involved in {x}?",
               "How long does {x} usually take?", "What do you need for {x}?", "Write a short paragraph about {x}.",
               "Describe the usual order of steps in {x}.", "Describe someone {x}.",
               "What tools or items are used for {x}?"],
}
TOPICS = {"place": PLACES, "object": OBJECTS, "errand": ERRANDS}
SPLIT_SHARES = (("eval", 0.15), ("rl", 0.35), ("train", 0.50))  # of the topics, by hash


@dataclass
class Config:
    out_dir: str = "out/sentiment"
    model: str = ""  # the policy that writes the replies; empty = SmolLM2-135M-Instruct from scripts/smollm2.py
    n_pairs: int = 256  # training pairs -> prefs.jsonl (samples // 2 pairs per prompt); fewer if some are dropped
    n_eval_pairs: int = 128  # held-out pairs on held-out topics -> prefs_eval.jsonl
    samples: int = 2  # replies per prompt; consecutive replies are paired
    max_new_tokens: int = 48  # a reply is cut here (most of SmolLM2's replies are longer)
    temperature: float = 1.0  # sampling temperature (1 = the policy's own distribution)
    bt_temperature: float = 0.1  # Bradley-Terry label noise: P(a > b) = sigmoid((g_a - g_b) / t)
    system: str = ""  # a system message for every prompt; empty = the chat template's default one
    batch_size: int = 32  # replies sampled at once
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------------------------
# Pure functions: prompts, splits, labels

def split_of(topic: str) -> str:
    """The split a topic belongs to (SPLIT_SHARES), from a hash of its name: the same on every machine."""
    u = int.from_bytes(hashlib.sha256(topic.encode()).digest()[:8], "little") / 2**64
    for name, share in SPLIT_SHARES:
        if u < share:
            return name
        u -= share
    return SPLIT_SHARES[-1][0]


def all_prompts() -> dict:
    """split -> list of prompt texts (TEMPLATES x TOPICS, in a fixed order)."""
    out = {name: [] for name, _ in SPLIT_SHARES}
    for kind, topics in TOPICS.items():
        for topic in topics:
            out[split_of(topic)] += [t.format(x=topic) for t in TEMPLATES[kind]]
    return out


def chat(text: str, system: str) -> list[dict]:
    """A prompt as chat messages: the user's text, after `system` when one is given."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def bt_prob(g_a: float, g_b: float, t: float) -> float:
    """P(a is chosen over b) = σ((g_a - g_b) / t), for scalars (Bradley-Terry with temperature t)."""
    return 1.0 / (1.0 + math.exp(-(g_a - g_b) / t))


def agreement(g_chosen: list[float], g_rejected: list[float]) -> float:
    """Share of pairs (N,) whose label agrees with the gold order, ties counting ½: the labels' own
    pairwise accuracy, the ceiling of a value model's (evaluation.gold_accuracy's rule)."""
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(g_chosen, g_rejected)) / max(len(g_chosen), 1)


# ----------------------------------------------------------------------------------------------
# Sampling and labelling

@torch.no_grad()
def sample(policy, tok, prompts: list, cfg: Config, device) -> tuple[list[str], dict]:
    """cfg.samples replies per prompt (rows i*samples .. i*samples + samples-1), and the speed."""
    rows = [p for p in prompts for _ in range(cfg.samples)]
    gen = tu.torch_rng(cfg.seed, "sentiment/sample", device=device)
    texts, n_tokens, n_steps, n_cut = [], 0, 0, 0
    stops = data.stop_token_ids(tok, policy.generation_config)
    t0, c0 = time.time(), time.process_time()
    bar = tqdm(total=len(rows), desc="sampling", unit="reply")
    for i in range(0, len(rows), cfg.batch_size):
        ids = [data.encode_prompt(tok, p) for p in rows[i:i + cfg.batch_size]]
        b = model.rollout(policy, ids, tok, cfg.max_new_tokens, cfg.temperature, 1.0, gen, device)
        texts += [data.decode_response(tok, r, stops) for r in model.responses(b)]
        n_tokens += int(b["response_len"].sum())
        n_steps += len(ids) * b["response"].shape[1]  # padded work: every row runs until the batch stops
        n_cut += int(b["truncated"].sum())
        bar.update(len(ids))
        bar.set_postfix(tok_s=f"{n_tokens / (time.time() - t0):.0f}")
    bar.close()
    seconds = time.time() - t0
    return texts, {"seconds": seconds, "cpu_seconds": time.process_time() - c0, "replies": len(rows),
                   "tokens": n_tokens, "tokens_per_s": n_tokens / seconds, "padded_tokens_per_s": n_steps / seconds,
                   "mean_reply_tokens": n_tokens / len(rows), "truncated_share": n_cut / len(rows)}


def label_pairs(prompts: list, texts: list[str], split: str, cfg: Config, policy_name: str):
    """(preference rows, gold rows, dropped count) for consecutive replies of each prompt."""
    prefs, gold, dropped = [], [], 0
    for i, p in enumerate(prompts):
        ys = texts[i * cfg.samples:(i + 1) * cfg.samples]
        for j in range(0, cfg.samples - 1, 2):
            a, b = ys[j], ys[j + 1]
            if not a.strip() or not b.strip() or a == b:  # the data loader rejects these
                dropped += 1
                continue
            g_a, g_b = vader(p, a), vader(p, b)
            u = tu.python_rng(cfg.seed, "sentiment/label", split, i, j).random()
            a_wins = u < bt_prob(g_a, g_b, cfg.bt_temperature)
            (c, gc), (r, gr) = ((a, g_a), (b, g_b)) if a_wins else ((b, g_b), (a, g_a))
            prefs.append({"prompt": p, "chosen": p + [{"role": "assistant", "content": c}],
                          "rejected": p + [{"role": "assistant", "content": r}], "policy": policy_name})
            gold.append({"split": split, "prompt": p, "chosen": c, "rejected": r, "gold_chosen": gc,
                         "gold_rejected": gr})
    return prefs, gold, dropped


def write_jsonl(path: str, rows: list[dict]):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} records to {path}")


def describe(xs: list[float]) -> dict:
    """Mean, sd and the shares VADER calls positive (> 0.05), negative (< -0.05) and exactly 0 of scores (N,)."""
    n = len(xs)
    return {"n": n, "mean": statistics.fmean(xs), "sd": statistics.pstdev(xs),
            "share_positive": sum(x > 0.05 for x in xs) / n, "share_negative": sum(x < -0.05 for x in xs) / n,
            "share_zero": sum(x == 0 for x in xs) / n}


# ----------------------------------------------------------------------------------------------
# main

def main(cfg: Config):
    if cfg.samples < 2 or cfg.samples % 2:
        raise tu.ConfigError(f"--samples must be an even number >= 2 (replies are paired), got {cfg.samples}")
    if cfg.bt_temperature <= 0 or cfg.n_pairs < 1 or cfg.n_eval_pairs < 1:
        raise tu.ConfigError("--bt_temperature, --n_pairs and --n_eval_pairs must be positive")
    path = cfg.model or smollm2.default_out_dir()
    if not os.path.exists(os.path.join(path, "config.json")):
        raise tu.ConfigError(f"no model at {path!r}: run `python scripts/smollm2.py` first, or pass --model")
    device = fu.setup(cfg.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    prompts = all_prompts()
    chosen_prompts = {}
    for split, n_pairs in (("train", cfg.n_pairs), ("eval", cfg.n_eval_pairs)):
        need = math.ceil(n_pairs / (cfg.samples // 2))
        if need > len(prompts[split]):
            raise tu.ConfigError(f"--n_{'pairs' if split == 'train' else 'eval_pairs'} {n_pairs} needs {need} "
                                 f"{split} prompts at --samples {cfg.samples}; there are {len(prompts[split])}")
        texts = list(prompts[split])
        tu.python_rng(cfg.seed, "sentiment/prompts", split).shuffle(texts)
        chosen_prompts[split] = [chat(t, cfg.system) for t in texts[:need]]
    write_jsonl(os.path.join(cfg.out_dir, "prompts.jsonl"), [{"messages": chat(t, cfg.system)} for t in prompts["rl"]])

    policy, tok = model.load_policy(path, device)
    policy.eval()
    name = os.path.basename(os.path.normpath(path)) + f"@T{cfg.temperature:g}"  # the `policy` field (τ groups by it)
    stats = {"config": vars(cfg), "model": path, "prompts": {k: len(v) for k, v in prompts.items()}}
    gold_rows = []
    for split in ("train", "eval"):
        print(f"{split}: {len(chosen_prompts[split])} prompts x {cfg.samples} replies")
        texts, speed = sample(policy, tok, chosen_prompts[split], cfg, device)
        prefs, gold, dropped = label_pairs(chosen_prompts[split], texts, split, cfg, name)
        write_jsonl(os.path.join(cfg.out_dir, "prefs.jsonl" if split == "train" else "prefs_eval.jsonl"), prefs)
        gold_rows += gold
        g = [vader(None, t) for t in texts]
        stats[split] = {"pairs": len(prefs), "dropped_pairs": dropped, "sampling": speed, "vader": describe(g),
                        "gold_ties": sum(r["gold_chosen"] == r["gold_rejected"] for r in gold),
                        "label_accuracy": agreement([r["gold_chosen"] for r in gold],
                                                    [r["gold_rejected"] for r in gold]),
                        "seconds_per_pair": speed["seconds"] / max(len(prefs), 1)}
        print(f"{split}: VADER mean {stats[split]['vader']['mean']:.3f} sd {stats[split]['vader']['sd']:.3f}; "
              f"labels agree with the gold order on {stats[split]['label_accuracy']:.3f} of {len(prefs)} pairs "
              f"({stats[split]['gold_ties']} gold ties, {dropped} dropped); {speed['tokens_per_s']:.1f} tokens/s, "
              f"{speed['truncated_share']:.2f} of replies cut at {cfg.max_new_tokens} tokens")
    write_jsonl(os.path.join(cfg.out_dir, "gold_pairs.jsonl"), gold_rows)
    with open(os.path.join(cfg.out_dir, "data_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    print(f"wrote {os.path.join(cfg.out_dir, 'data_stats.json')}")


if __name__ == "__main__":
    try:
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError) as e:  # bad input or flag: one clear line, no traceback
        sys.exit(f"make_data.py: {e}")
