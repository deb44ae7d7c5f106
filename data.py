"""data.py — tasks, data formats, tokenization, collation and sampling shared by every script.

What lives here (plumbing, no RL math):
  1. The built-in task: sort a short list of digits. Prompt "52817:" -> response "12578" + EOS.
     A hidden gold reward scores a response by the share of positions that hold the right digit:
         gold(x, y) = #{i : y_i = sorted(x)_i} / max(|sorted(x)|, |y|)          in [0, 1]
     so every wrong token lowers it and 1.0 is reachable. Demonstrations are deliberately flawed:
     random slips (p = 0.25 per digit) and one systematic confusion (7 written as 1 with p = 0.6),
     so an SFT policy lands well below 1.0 even when decoded greedily, and RL has to learn from
     preferences what imitation cannot. The training code only ever sees
     the gold reward through Bradley-Terry preference labels: P(a > b) = sigmoid((g_a - g_b) / t).
  2. A character-level tokenizer (printable ASCII + \\t \\n, pad, eos, unk) built in code as a
     `PreTrainedTokenizerFast`, and a tiny Llama built from a config: no download anywhere.
  3. Real data from JSONL / JSON-array files: preferences {prompt, chosen, rejected} (strings or
     chat-message lists; HH-RLHF transcripts are split at the last "\\n\\nAssistant:"), the released
     DVPO code's {question, response_j, response_k}, scored {prompt, response, score}, prompts
     {prompt} or {messages}, SFT {prompt, response} or {messages}; an optional `policy` field.
     A malformed record raises `DataError("file:line: field 'x': ...")`, or is skipped and counted
     with skip_bad=True.
  4. Token layout (docs/algorithm.md §1): sequence z = x ⊕ y. Logits at position i score z_{i+1},
     so the log-prob of y_t is read at position P+t-2 and the value chain is w_k = u_{P-1+k},
     k = 0..T. `gather_response` reads these response-aligned slices per row, whatever the padding
     side; `value_chain` is the chain of a value model, `tau_prefix` renders τ (§8).
  5. Sampling with a KV cache (temperature, top-p, cut at the first stop token, truncation flagged).
     A response's end token: every training response ends with `end_of_turn_id` (the chat template's
     end-of-turn token, e.g. <|im_end|>, else EOS); sampling stops at any of `stop_token_ids` (that
     token, the tokenizer's EOS and the model's generation_config.eos_token_id).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import string
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

# ----------------------------------------------------------------------------------------------
# 1. The built-in task: sort digits, with a hidden gold reward

BUILTIN_MIN_DIGITS, BUILTIN_MAX_DIGITS = 4, 7
BUILTIN_DEMO_ERROR = 0.25 # probability that a demonstration digit is replaced by a random digit
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


def bt_label(g_a: float, g_b: float, temperature: float, rng: random.Random) -> bool:
    """Bradley-Terry noisy label: True means a is preferred, with P = sigmoid((g_a - g_b) / t)."""
    return rng.random() < 1.0 / (1.0 + math.exp(-(g_a - g_b) / temperature))


# ----------------------------------------------------------------------------------------------
# 3. Real data formats

class DataError(ValueError):
    """A malformed record; the message names the file, the line (or array item) and the field."""


@dataclass
class LoadStats:
    """What happened while reading a file: nothing is dropped without being counted here."""
    path: str
    read: int = 0
    kept: int = 0
    skipped: list = field(default_factory=list)  # error messages of skipped records

    def summary(self) -> str:
        s = f"{self.path}: read {self.read} records, kept {self.kept}, skipped {len(self.skipped)} bad"
        return s + (f" (first: {self.skipped[0]})" if self.skipped else "")


def read_records(path: str) -> list[tuple[str, object]]:
    """(location, record) pairs from a JSONL file ("line N") or a JSON array file ("item N").
    Bad JSON raises DataError naming the file and line; blank JSONL lines are ignored."""
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from None
    lines = raw.split(b"\n")
    if raw.lstrip().startswith(b"["):
        try:
            items = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line_no = raw[:e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line_no}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON array: {e.msg}") from None
        return [(f"{path}: item {i}", r) for i, r in enumerate(items)]
    out = []
    for n, bline in enumerate(lines, 1):
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError:
            out.append((f"{path}:{n}", DataError(f"{path}:{n}: not valid UTF-8")))
            continue
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((f"{path}:{n}", DataError(f"{path}:{n}: invalid JSON: {e.msg}")))
    return out


def _messages(value, where: str, name: str) -> list[dict]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise DataError(f"{where}: field '{name}': expected a non-empty list of {{role, content}} string messages")
    return value


def _text(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{name}': empty")
    return value


def _get(rec, key: str, where: str):
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        raise DataError(f"{where}: field '{key}': missing (record has {sorted(rec)})")
    return rec[key]


def _prompt(value, where: str, name: str = "prompt"):
    """A prompt is a non-empty string or a list of chat messages."""
    return _messages(value, where, name) if isinstance(value, list) else _text(value, where, name)


def _response(value, where: str, name: str):
    """A response is a string, or a message list whose last message is the assistant's answer.
    Returns (context messages or None, response text)."""
    if isinstance(value, list):
        msgs = _messages(value, where, name)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{name}': last message must be from the assistant")
        return msgs[:-1] or None, _text(msgs[-1]["content"], where, f"{name}[-1].content")
    return None, _text(value, where, name)


HH_SPLIT = "\n\nAssistant:"


def parse_preference(rec, where: str) -> dict:
    """One preference record -> {prompt, chosen, rejected, policy}. Accepted forms:
    {prompt, chosen, rejected} with strings or message lists (UltraFeedback-binarized),
    {chosen, rejected} full HH-RLHF transcripts, and {question, response_j, response_k}
    (the released DVPO code; response_j is the preferred one)."""
    if isinstance(rec, dict) and "question" in rec:
        prompt, chosen_key, rejected_key = _prompt(rec["question"], where, "question"), "response_j", "response_k"
    else:
        prompt, chosen_key, rejected_key = None, "chosen", "rejected"
        if isinstance(rec, dict) and "prompt" in rec:
            prompt = _prompt(rec["prompt"], where)
    ctx_c, chosen = _response(_get(rec, chosen_key, where), where, chosen_key)
    ctx_r, rejected = _response(_get(rec, rejected_key, where), where, rejected_key)
    if ctx_c is not None or ctx_r is not None:  # chat form: the context messages are the prompt
        if ctx_c != ctx_r:
            raise DataError(f"{where}: field '{rejected_key}': conversation context differs from '{chosen_key}'")
        prompt = ctx_c
    elif prompt is None:  # HH-RLHF: split the full transcripts at the last assistant turn
        k, cut_c, cut_r = len(HH_SPLIT), chosen.rfind(HH_SPLIT), rejected.rfind(HH_SPLIT)
        if cut_c < 0:
            raise DataError(f"{where}: field 'prompt': missing, and '{chosen_key}' has no "
                            "'\\n\\nAssistant:' turn to split at")
        if cut_r < 0 or rejected[:cut_r + k] != chosen[:cut_c + k]:
            raise DataError(f"{where}: field '{rejected_key}': transcript before the last assistant turn "
                            f"differs from '{chosen_key}'")
        prompt, chosen, rejected = chosen[:cut_c + k], chosen[cut_c + k:], rejected[cut_r + k:]
        chosen, rejected = _text(chosen, where, chosen_key), _text(rejected, where, rejected_key)
    if chosen == rejected:
        raise DataError(f"{where}: fields '{chosen_key}'/'{rejected_key}': identical responses")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "policy": _policy(rec, where)}


def _policy(rec, where: str):
    p = rec.get("policy") if isinstance(rec, dict) else None
    if p is not None and not isinstance(p, str):
        raise DataError(f"{where}: field 'policy': expected a string, got {type(p).__name__}")
    return p


def parse_scored(rec, where: str) -> dict:
    """{prompt, response, score} with a finite numeric score."""
    prompt = _prompt(_get(rec, "prompt", where), where)
    ctx, response = _response(_get(rec, "response", where), where, "response")
    score = _get(rec, "score", where)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(f"{where}: field 'score': expected a finite number, got {score!r}")
    return {"prompt": ctx or prompt, "response": response, "score": float(score), "policy": _policy(rec, where)}


def parse_prompt(rec, where: str) -> dict:
    """{prompt} (string or messages) or {messages}."""
    if isinstance(rec, dict) and "prompt" not in rec and "messages" in rec:
        return {"prompt": _messages(rec["messages"], where, "messages")}
    return {"prompt": _prompt(_get(rec, "prompt", where), where)}


def parse_sft(rec, where: str) -> dict:
    """{prompt, response} or {messages} whose last message is the assistant's answer."""
    if isinstance(rec, dict) and "messages" in rec and "response" not in rec:
        ctx, response = _response(rec["messages"], where, "messages")
        if ctx is None:
            raise DataError(f"{where}: field 'messages': needs at least one message before the assistant's")
        return {"prompt": ctx, "response": response}
    prompt = _prompt(_get(rec, "prompt", where), where)
    ctx, response = _response(_get(rec, "response", where), where, "response")
    return {"prompt": ctx or prompt, "response": response}


PARSERS = {"preference": parse_preference, "scored": parse_scored, "prompt": parse_prompt, "sft": parse_sft}


def load_records(path: str, kind: str, skip_bad: bool = False) -> tuple[list[dict], LoadStats]:
    """Read and validate a whole file of `kind` in PARSERS. Without skip_bad the first bad record
    raises DataError; with it, bad records are skipped and counted in the returned LoadStats."""
    parse, stats, out = PARSERS[kind], LoadStats(path), []
    for where, rec in read_records(path):
        stats.read += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            out.append(parse(rec, where))
        except DataError as e:
            if not skip_bad:
                raise
            stats.skipped.append(str(e))
    stats.kept = len(out)
    if not out:
        raise DataError(f"{path}: no usable {kind} records ({stats.summary()})")
    return out, stats


# ----------------------------------------------------------------------------------------------
# Tokenization: exact prompt/response boundaries

@dataclass
class TruncationStats:
    prompts_cut: int = 0  # prompts truncated from the left
    responses_cut: int = 0  # responses truncated from the right (they lose their EOS)

    def summary(self) -> str:
        return f"truncated {self.prompts_cut} prompts (left) and {self.responses_cut} responses (right)"


def encode_prompt(tokenizer, prompt, max_len: int | None = None, stats: TruncationStats | None = None) -> list[int]:
    """Prompt token ids. Chat messages go through the tokenizer's chat template with
    add_generation_prompt=True (the template writes BOS itself, so no special tokens are added
    again); plain strings get the tokenizer's usual special tokens, minus a trailing EOS."""
    if isinstance(prompt, list):
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:  # no template: a plain, documented rendering
            text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
        if ids and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]
    if max_len is not None and len(ids) > max_len:
        ids = ids[-max_len:]
        if stats is not None:
            stats.prompts_cut += 1
    return ids


def end_of_turn_id(tokenizer) -> int:
    """The token that ends every response of the training data (SFT targets, GVM and RM rows): the
    chat template's end-of-turn token when the tokenizer has a template (`<|im_end|>` for ChatML,
    `<|eot_id|>` for Llama 3, even when the tokenizer's EOS is another token such as Qwen2.5's
    `<|endoftext|>`), else the tokenizer's EOS. Found by rendering a one-turn conversation: the first
    special token after the assistant's text. Templates that put none there (or fail to render a
    user/assistant pair) end responses with EOS. Memoized per tokenizer and template."""
    return _end_of_turn_id(tokenizer, tokenizer.chat_template, tokenizer.eos_token_id)


@functools.lru_cache(maxsize=16)
def _end_of_turn_id(tokenizer, template, eos_id: int) -> int:
    if not template:
        return eos_id
    marker = "\u2063dvpo-response\u2063"  # text no template rewrites: where the assistant's content ends
    try:
        turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # noqa: BLE001 — any template error (jinja raises its own types): keep EOS
        return eos_id
    if marker not in text:
        return eos_id
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tail = tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    return next((i for i in tail if i in special), eos_id)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Tokens that end a sampled response: the tokenizer's EOS, the end-of-turn token of the
    training data (end_of_turn_id) and the model's generation_config.eos_token_id (an int or a list:
    Llama 3 and Qwen2.5 list several), sorted."""
    extra = getattr(generation_config, "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return sorted({tokenizer.eos_token_id, end_of_turn_id(tokenizer), *extra} - {None})


def encode_response(tokenizer, response: str, max_len: int | None = None,
                    stats: TruncationStats | None = None) -> list[int]:
    """Response ids with no special tokens but one end token (end_of_turn_id: the chat template's
    end-of-turn token, else EOS) at the end (lost if truncated)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    if max_len is not None and len(ids) > max_len:
        ids = ids[:max_len]
        if stats is not None:
            stats.responses_cut += 1
    return ids


def decode_response(tokenizer, ids, stop_ids=None) -> str:
    """Text of a response, cut at its first stop token (stop_ids; default: the tokenizer's EOS and
    end-of-turn token), special tokens dropped."""
    ids, stops = list(ids), set(stop_token_ids(tokenizer) if stop_ids is None else stop_ids)
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def check_context(longest: int, model_config, what: str):
    """Fail before training, not deep in the loop, if a sequence exceeds the model's context."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit and longest > limit:
        raise DataError(f"the longest {what} is {longest} tokens, more than the model's context of {limit} "
                        f"positions; lower --max_prompt_len / --max_response_len (or --max_new_tokens, tau lengths)")


def shard(items: list, rank: int, world: int) -> list:
    """Each rank reads its own strided shard."""
    return items[rank::world]


# ----------------------------------------------------------------------------------------------
# 4. Collation and response-aligned indexing

def collate_right(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Training batch: z = x ⊕ y, right-padded. Returns input_ids / attention_mask (B, L),
    prompt_len and response_len (B,)."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "prompt_len": torch.tensor([len(p) for p in prompts]),
            "response_len": torch.tensor([len(r) for r in responses])}


def collate_left(prompts: list[list[int]], pad_id: int) -> dict:
    """Generation batch: prompts left-padded so that every row's next token is at column P."""
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def gather_response(x: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """Per-row slice x[b, start_b : start_b + length] of a (B, L, ...) tensor -> (B, length, ...).
    Out-of-range positions are clamped; mask them with `response_mask`."""
    idx = (start[:, None] + torch.arange(length, device=x.device)[None, :]).clamp(0, x.shape[1] - 1)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def response_mask(response_len: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) float mask, 1 on the first response_len_b entries of each row."""
    return (torch.arange(length, device=response_len.device)[None, :] < response_len[:, None]).float()


def value_chain(u: torch.Tensor, prompt_len: torch.Tensor, response_len: torch.Tensor):
    """Per-position values u (B, L) -> chain w (B, T+1) with w_k = u_{P-1+k}, and its mask
    (B, T+1) (1 on k = 0..T_b). P includes any τ prefix, so τ never enters the chain.
    w_0 = V(prompt), w_k = Q(s_k, a_k), w_T ≈ r(x, y) (docs/algorithm.md §1)."""
    T = int(response_len.max())
    return gather_response(u, prompt_len - 1, T + 1), response_mask(response_len + 1, T + 1)


def tau_prefix(examples: list[tuple[list[int], list[int]]], prompt_len: int, response_len: int) -> list[int]:
    """The τ prefix (docs/algorithm.md §8): K (prompt ids, response ids) pairs, each prompt cut from
    the left to prompt_len tokens and each response from the right to response_len, concatenated
    in order (a response keeps its EOS unless cut, which marks where each trajectory ends)."""
    out = []
    for p, r in examples:
        out += p[-prompt_len:] + r[:response_len]
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row is computed like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, batch: dict, T: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log pi(y_t | s_t) and the entropy of pi(. | s_t) for t = 1..T, response-aligned (B, T).
    Logits at position i score token i+1, so y_t (at P+t-1) is scored at position P+t-2."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids(am)).logits.float()  # (B, L, V)
    start = batch["prompt_len"] - 1
    logits = gather_response(logits, start, T) / temperature  # (B, T, V)
    targets = gather_response(ids, start + 1, T)  # (B, T)
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ----------------------------------------------------------------------------------------------
# 5. Sampling with a KV cache

def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens. temperature 0 is greedy; top_p < 1 keeps the smallest set of
    tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, order = probs.sort(-1, descending=True)
        drop = p_sorted.cumsum(-1) - p_sorted > top_p  # tokens entirely beyond the nucleus
        probs = torch.zeros_like(probs).scatter(-1, order, p_sorted.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids, attention_mask, max_new_tokens: int, eos_id: int | list[int], pad_id: int,
             temperature: float = 1.0, top_p: float = 1.0, generator=None, min_new_tokens: int = 0):
    """Sample responses for left-padded prompts (B, P) with a KV cache. eos_id: the stop token, or a
    list of them (stop_token_ids); "EOS" below is any of them.
    Returns response ids (B, T) padded with pad_id after the first EOS, response_len (B,) counting
    the EOS, and truncated (B,) bool for rows that hit max_new_tokens without an EOS.
    min_new_tokens forces fixed-length generation (EOS is masked until then; used by bench.py)."""
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=input_ids.device)
    position = position_ids(attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    B = input_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    length = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    pos, mask, tokens = position[:, -1], attention_mask, []
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits = logits.clone()
            logits[:, stops] = -float("inf")
        tok = sample_token(logits, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        length += (~done).long()
        done |= torch.isin(tok, stops)
        if bool(done.all()):  # note: a CPU-GPU sync point, once per token
            break
        pos = pos + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return torch.stack(tokens, 1), length, ~done


def sample_texts(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 64, generator=None, device="cpu") -> list[str]:
    """Decoded responses for a list of prompts (strings or messages), in batches."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = collate_left([encode_prompt(tokenizer, p) for p in prompts[i:i + batch_size]], tokenizer.pad_token_id)
        stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        ids, _, _ = generate(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), max_new_tokens,
                             stops, tokenizer.pad_token_id, temperature, top_p, generator)
        out += [decode_response(tokenizer, row.tolist(), stops) for row in ids]
    return out


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / max(n - 1, 1)
    return m, math.sqrt(var / n)


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


def sample_builtin(model, tokenizer, prompts: list[str], sampler: str, generator, rng: random.Random,
                   prefixes: list[str] | None = None, max_new_tokens: int = 16, batch_size: int = 256,
                   device="cpu") -> list[str]:
    """Responses of `sampler` for built-in prompts; with prefixes, each continues prefixes[i] (kept
    as is: the sampler's late slips touch only the new characters)."""
    temperature, late = parse_sampler(sampler)
    prefixes = prefixes or [""] * len(prompts)
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, pre = prompts[i:i + batch_size], prefixes[i:i + batch_size]
        ids = [encode_prompt(tokenizer, p) + tokenizer(x, add_special_tokens=False)["input_ids"]
               for p, x in zip(ps, pre)]
        enc = collate_left(ids, tokenizer.pad_token_id)
        new, _, _ = generate(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                             max_new_tokens - len(max(pre, key=len)), tokenizer.eos_token_id, tokenizer.pad_token_id,
                             temperature, 1.0, generator)
        out += [x + decode_response(tokenizer, row.tolist()) for x, row in zip(pre, new)]
    return [late_slips(p, y, late, rng, len(x)) if late else y for p, y, x in zip(prompts, out, prefixes)]


def builtin_pairs(model, tokenizer, prompts: list[str], sampler: str, policy: str, bt_temperature: float,
                  seed: int, batch_size: int = 128, device="cpu") -> tuple[list[dict], int]:
    """Preference pairs on the built-in task: two responses per prompt from `sampler` (see above),
    labelled by the gold reward through Bradley-Terry noise. Pairs with identical texts carry no
    preference and are dropped; their count is returned. Each row keeps the gold rewards (for
    evaluation only) and the `policy` that sampled it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    slips = random.Random(f"{seed}-slips")
    a = sample_builtin(model, tokenizer, prompts, sampler, gen, slips, batch_size=batch_size, device=device)
    b = sample_builtin(model, tokenizer, prompts, sampler, gen, slips, batch_size=batch_size, device=device)
    rng, rows, same = random.Random(seed), [], 0
    for p, ya, yb in zip(prompts, a, b):
        if ya == yb or not ya or not yb:
            same += 1
            continue
        ga, gb = gold_reward(p, ya), gold_reward(p, yb)
        if not bt_label(ga, gb, bt_temperature, rng):
            ya, yb, ga, gb = yb, ya, gb, ga
        rows.append({"prompt": p, "chosen": ya, "rejected": yb, "policy": policy,
                     "gold_chosen": ga, "gold_rejected": gb})
    return rows, same
