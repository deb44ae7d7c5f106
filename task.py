"""task.py — the built-in task: sort digits, with a hidden gold reward (no download anywhere).

  1. Prompt "52817:" -> response "12578" + EOS. A hidden gold reward scores a response by the share of
     positions that hold the right digit:
         gold(x, y) = #{i : y_i = sorted(x)_i} / max(|sorted(x)|, |y|)          in [0, 1]
     so every wrong token lowers it and 1.0 is reachable. Demonstrations are deliberately flawed:
     random slips (p = 0.25 per digit) and one systematic confusion (7 written as 1 with p = 0.6),
     so an SFT policy lands well below 1.0 even when decoded greedily, and RL has to learn from
     preferences what imitation cannot. The training code only ever sees the gold reward through
     Bradley-Terry preference labels: P(a > b) = sigmoid((g_a - g_b) / t).
  2. A character-level tokenizer (printable ASCII + \\t \\n, pad, eos, unk) built in code as a
     `PreTrainedTokenizerFast`, and a tiny Llama built from a config (load_tiny_policy: the policy
     sft.py starts from when no --model is given).
  3. Samplers of the SFT policy ("T1.0", "T1.0+late0.5") and the preference pairs they give.
  4. What the gold reward makes measurable: the true return-to-go of a prefix by Monte Carlo
     (docs/algorithm.md §11). (The gold labels' own pairwise accuracy: evaluation.gold_accuracy.)
The scripts use it when no --data / --prompts are given: `python sft.py && python gvm.py && ...`.
"""
from __future__ import annotations

import hashlib
import math
import random
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import data
import fsdp_utils as fu
import model
import train_utils as tu

# ----------------------------------------------------------------------------------------------
# 1. The built-in task: sort digits, with a hidden gold reward

BUILTIN_MIN_DIGITS, BUILTIN_MAX_DIGITS = 4, 7
BUILTIN_DEMO_ERROR = 0.25  # probability that a demonstration digit is replaced by a random digit
BUILTIN_CONFUSION = ("7", "1", 0.6)  # ... and the demonstrator writes 7 as 1 more often than not


def _is_heldout(prompt: str) -> bool:
    """Deterministic split by content hash: 1 prompt in 8 is held out, never seen in training."""
    return hashlib.sha256(prompt.encode()).digest()[0] % 8 == 0


def builtin_prompts(n: int, split: str = "train", seed: int = 0) -> list[str]:
    """n prompts like "52817:" from a seeded generator; 'train' and 'eval' splits are disjoint."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"builtin-{split}-{seed}")
    out = []
    while len(out) < n:
        k = rng.randint(BUILTIN_MIN_DIGITS, BUILTIN_MAX_DIGITS)
        p = "".join(rng.choice(string.digits) for _ in range(k)) + ":"
        if _is_heldout(p) == (split == "eval"):
            out.append(p)
    return out


def builtin_target(prompt: str) -> str:
    return "".join(sorted(prompt.rstrip(":")))


def gold_reward(prompt: str, response: str) -> float:
    """Share of positions holding the right digit: #{i: y_i = t_i} / max(|t|, |y|), in [0, 1]."""
    target = builtin_target(prompt)
    hits = sum(a == b for a, b in zip(response, target))
    return hits / max(len(target), len(response), 1)


def builtin_demo(prompt: str, rng: random.Random, error: float = BUILTIN_DEMO_ERROR,
                 confusion: tuple = BUILTIN_CONFUSION) -> str:
    """A deliberately imperfect demonstration of the sorted answer: a systematic confusion
    (7 written as 1 with probability 0.6, so imitation's most likely answer is wrong) and random
    slips (any digit replaced by a uniformly random one with probability `error`)."""
    src, dst, p_conf = confusion
    out = []
    for c in builtin_target(prompt):
        if c == src and rng.random() < p_conf:
            c = dst
        out.append(rng.choice(string.digits) if rng.random() < error else c)
    return "".join(out)


def builtin_sft_data(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"builtin-demos-{seed}")
    return [{"prompt": p, "response": builtin_demo(p, rng)} for p in builtin_prompts(n, "train", seed)]


def bt_label(g_a: float, g_b: float, temperature: float, rng: random.Random) -> bool:
    """Bradley-Terry noisy label: True means a is preferred, with P = sigmoid((g_a - g_b) / t)."""
    return rng.random() < 1.0 / (1.0 + math.exp(-(g_a - g_b) / temperature))


# ----------------------------------------------------------------------------------------------
# 2. A character tokenizer and a tiny Llama, built in code

def build_char_tokenizer():
    """Character-level tokenizer over printable ASCII plus \\t and \\n; ids 0/1/2 = pad/eos/unk.
    A standard `PreTrainedTokenizerFast`: save_pretrained / AutoTokenizer.from_pretrained work."""

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in ["\t", "\n"] + [chr(i) for i in range(32, 127)]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    tk.decoder = decoders.Fuse()  # join tokens without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


TINY_PRESET = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4)


def build_tiny_model(tokenizer, seed: int = 0, **overrides):
    """A tiny Llama (~0.6M parameters) from a config; no weights are downloaded."""
    kw = dict(TINY_PRESET, **overrides)
    cfg = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=None, num_key_value_heads=kw["num_attention_heads"], **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def load_tiny_policy(device="cpu", seed: int = 0):
    """(model, tokenizer): the built-in tiny Llama and the char tokenizer, on `device`, sharded under
    torchrun like every other model (fsdp_utils.on_device); fp32, trained by sft.py."""
    tok = build_char_tokenizer()
    return fu.on_device(lambda meta: build_tiny_model(tok, seed=seed), device), tok


# ----------------------------------------------------------------------------------------------
# 3. Samplers of the SFT policy and preference pairs

# Samplers of the built-in task (gvm.py --builtin_samplers): "T<t>" samples the SFT policy at
# temperature t; "T<t>+late<p>" samples the same way, then replaces each digit of the response's second
# half by a uniformly random digit with probability p: a policy indistinguishable from "T<t>" on early
# tokens that slips late, so the value of a prefix depends on which policy will complete it (the case
# trajectory conditioning τ is for, docs/algorithm.md §8).

def parse_sampler(spec: str) -> tuple[float, float]:
    """'T1.0' -> (temperature 1.0, late slip probability 0.0); 'T1.0+late0.5' -> (1.0, 0.5)."""
    temp, _, late = spec.partition("+late")
    try:
        if not temp.startswith("T"):
            raise ValueError
        return float(temp[1:]), float(late) if late else 0.0
    except ValueError:
        raise ValueError(f"sampler {spec!r}: expected T<temperature> or T<temperature>+late<probability>") from None


def late_slips(prompt: str, response: str, p: float, rng: random.Random, start: int = 0) -> str:
    """Each character at response position i >= max(start, ceil(n/2)), n the number of digits to
    sort, becomes a uniformly random digit with probability p (positions < start are kept: a prefix)."""
    half = math.ceil(len(builtin_target(prompt)) / 2)
    return "".join(rng.choice(string.digits) if i >= max(start, half) and rng.random() < p else c
                   for i, c in enumerate(response))


def sample_builtin(policy, tokenizer, prompts: list[str], sampler: str, generator, rng: random.Random,
                   prefixes: list[str] | None = None, max_new_tokens: int = 16, batch_size: int = 256,
                   device="cpu") -> list[str]:
    """Responses of `sampler` for built-in prompts; with prefixes, each continues prefixes[i] (kept
    as is: the sampler's late slips touch only the new characters)."""
    temperature, late = parse_sampler(sampler)
    prefixes = prefixes or [""] * len(prompts)
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, pre = prompts[i:i + batch_size], prefixes[i:i + batch_size]
        ids = [data.encode_prompt(tokenizer, p) + tokenizer(x, add_special_tokens=False)["input_ids"]
               for p, x in zip(ps, pre)]
        enc = data.collate_left(ids, tokenizer.pad_token_id)
        new, _, _ = model.generate(policy, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                  max_new_tokens - len(max(pre, key=len)), tokenizer.eos_token_id,
                                  tokenizer.pad_token_id, temperature, 1.0, generator)
        out += [x + data.decode_response(tokenizer, row.tolist()) for x, row in zip(pre, new)]
    return [late_slips(p, y, late, rng, len(x)) if late else y for p, y, x in zip(prompts, out, prefixes)]


def builtin_pairs(policy, tokenizer, prompts: list[str], sampler: str, policy_name: str, bt_temperature: float,
                  seed: int, batch_size: int = 128, device="cpu") -> tuple[list[dict], int]:
    """Preference pairs on the built-in task: two responses per prompt from `sampler` (see above),
    labelled by the gold reward through Bradley-Terry noise. Pairs with identical texts carry no
    preference and are dropped; their count is returned. Each row keeps the gold rewards (for
    evaluation only) and the `policy` that sampled it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    slips = random.Random(f"{seed}-slips")
    a = sample_builtin(policy, tokenizer, prompts, sampler, gen, slips, batch_size=batch_size, device=device)
    b = sample_builtin(policy, tokenizer, prompts, sampler, gen, slips, batch_size=batch_size, device=device)
    rng, rows, same = random.Random(seed), [], 0
    for p, ya, yb in zip(prompts, a, b):
        if ya == yb or not ya or not yb:
            same += 1
            continue
        ga, gb = gold_reward(p, ya), gold_reward(p, yb)
        if not bt_label(ga, gb, bt_temperature, rng):
            ya, yb, ga, gb = yb, ya, gb, ga
        rows.append({"prompt": p, "chosen": ya, "rejected": yb, "policy": policy_name,
                     "gold_chosen": ga, "gold_rejected": gb})
    return rows, same


def builtin_pair_splits(policy, tokenizer, samplers: list[str], n_train: int, n_eval: int, bt_temperature: float,
                        seed: int, device="cpu") -> dict:
    """{"train": rows, "eval": rows}: for each sampler i, one pair per prompt (builtin_pairs) on
    n_train training and n_eval held-out prompts, drawn from the streams (seed, "pairs/prompts", i) and
    (seed, "pairs", i, split)."""
    rows = {"train": [], "eval": []}
    for i, spec in enumerate(samplers):
        for split, n in (("train", n_train), ("eval", n_eval)):
            prompts = builtin_prompts(n, split, seed=tu.seed_for(seed, "pairs/prompts", i))
            r, dropped = builtin_pairs(policy, tokenizer, prompts, spec, f"sft@{spec}", bt_temperature,
                                       seed=tu.seed_for(seed, "pairs", i, split), device=device)
            print(f"built-in pairs: sampler sft@{spec} {split}: {len(r)} pairs "
                  f"({dropped} prompts gave two identical responses: no preference, dropped)")
            rows[split] += r
    return rows


# ----------------------------------------------------------------------------------------------
# 4. What the gold reward makes measurable

def mc_returns(policy, tokenizer, prompts: list[str], responses: list[str], cases: list[tuple], sampler: str,
               n: int, generator, rng: random.Random, device="cpu") -> torch.Tensor:
    """The true return-to-go of each case (i, k): the mean gold reward of n completions of the prefix
    responses[i][:k-1] of prompts[i] by `sampler` (Monte Carlo, docs/algorithm.md §11). (len(cases),)"""
    done = sample_builtin(policy, tokenizer, [prompts[i] for i, _ in cases for _ in range(n)], sampler, generator,
                          rng, [responses[i][:k - 1] for i, k in cases for _ in range(n)], device=device)
    rep = [c for c in cases for _ in range(n)]
    return torch.tensor([gold_reward(prompts[i], y) for (i, _), y in zip(rep, done)]).view(len(cases), n).mean(1)

