"""data.py — data formats, validation, tokenization and collation shared by every script.

What lives here (no model and no RL math: reading numbers off a model is model.py; the built-in task
is task.py):
  1. Real data from JSONL / JSON-array files: preferences {prompt, chosen, rejected} (strings or
     chat-message lists; HH-RLHF transcripts are split at the last "\\n\\nAssistant:"), the released
     DVPO code's {question, response_j, response_k}, scored {prompt, response, score}, prompts
     {prompt} or {messages}, SFT {prompt, response} or {messages}; an optional `policy` field.
     A malformed record raises `DataError("file:line: field 'x': ...")`, or is skipped and counted
     with skip_bad=True.
     split_heldout / load_rows: a file's training and held-out rows (the same split in every script);
     load_pairs: the pairwise trainers' pairs (a file, or exactly the GVM's pairs and split).
  2. Tokenization with exact prompt/response boundaries (encode_pairs for preference rows). A response's
     end token: every training response ends with `end_of_turn_id` (the chat template's end-of-turn
     token, e.g. <|im_end|>, else EOS); sampling stops at any of `stop_token_ids` (that token, the
     tokenizer's EOS and the model's generation_config.eos_token_id).
  3. Collation: z = x ⊕ y right-padded for training (collate_right; collate_pairs: chosen and rejected
     as consecutive rows), prompts left-padded for generation (collate_left), response masks, and the τ
     prefix (docs/algorithm.md §8).
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field

import torch

import fsdp_utils as fu
import train_utils as tu

# ----------------------------------------------------------------------------------------------
# 1. Real data formats

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
    for n, bline in enumerate(raw.split(b"\n"), 1):
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


def split_heldout(rows: list, n_eval: int, frac: float, seed: int, what: str) -> tuple[list, list]:
    """(training rows, held-out rows): shuffled with --seed, then min(n_eval, max(1, frac·N)) rows
    held out: at least one when there are two or more rows, never all of them; n_eval <= 0 holds
    none out. The same (seed, what) gives the same split in every script (gvm.py and reward_model.py)."""
    rows = list(rows)
    tu.python_rng(seed, "split", what).shuffle(rows)
    k = 0 if n_eval <= 0 or len(rows) < 2 else min(n_eval, max(1, int(frac * len(rows))), len(rows) - 1)
    return rows[k:], rows[:k]


def load_rows(path: str, eval_path: str, kind: str, skip_bad: bool, frac: float, seed: int) -> tuple[list, list]:
    """(training rows, held-out rows) of `kind` (PARSERS) from `path`, and from `eval_path` or else
    a split of `path` (split_heldout: gvm.py and reward_model.py split a file alike). Says what each
    file gave."""
    rows, stats = load_records(path, kind, skip_bad)
    fu.print0(stats.summary())
    if not eval_path:
        return split_heldout(rows, len(rows), frac, seed, kind)
    held, stats = load_records(eval_path, kind, skip_bad)
    fu.print0(stats.summary())
    return rows, held


GVM_PAIRS = ("out/gvm/pairs_train.jsonl", "out/gvm/pairs_eval.jsonl")  # written by gvm.py: the exact split


def load_pairs(path: str, eval_path: str, skip_bad: bool, frac: float, seed: int) -> tuple[list, list]:
    """(training pairs, held-out pairs) for the pairwise trainers (reward_model.py, dpo_baseline.py): a
    file with eval_path or a split (the same split as gvm.py's of that file), or, without a file, the
    exact pairs gvm.py trained and evaluated on (GVM_PAIRS), so every method sees the same data."""
    if not path:
        if not os.path.exists(GVM_PAIRS[0]):
            raise DataError(f"{GVM_PAIRS[0]} is missing; run `python gvm.py` first (the baselines train on "
                            "exactly the GVM's pairs), or pass --data")
        with open(GVM_PAIRS[0]) as f_train, open(GVM_PAIRS[1]) as f_eval:
            return [json.loads(line) for line in f_train], [json.loads(line) for line in f_eval]
    train_rows, eval_rows = load_rows(path, eval_path, "preference", skip_bad, frac, seed)
    if not eval_rows:
        raise DataError(f"{path}: {len(train_rows)} pair(s); at least 2 are needed (one held out), or pass "
                        "--eval_data")
    return train_rows, eval_rows


# ----------------------------------------------------------------------------------------------
# 2. Tokenization: exact prompt/response boundaries

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


def encode_pairs(rows: list[dict], tok, max_prompt_len: int, max_response_len: int,
                 trunc: TruncationStats) -> list[dict]:
    """Preference rows {prompt, chosen, rejected, policy} -> token ids {prompt, chosen, rejected, policy}."""
    out = []
    for r in rows:
        e = {"prompt": encode_prompt(tok, r["prompt"], max_prompt_len, trunc), "policy": r.get("policy")}
        for k in ("chosen", "rejected"):
            e[k] = encode_response(tok, r[k], max_response_len, trunc)
        out.append(e)
    return out


def check_context(longest: int, model_config, what: str):
    """Fail before training, not deep in the loop, if a sequence exceeds the model's context."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit and longest > limit:
        raise DataError(f"the longest {what} is {longest} tokens, more than the model's context of {limit} "
                        f"positions; lower --max_prompt_len / --max_response_len (or --max_new_tokens, tau lengths)")


# ----------------------------------------------------------------------------------------------
# 3. Collation

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


def collate_pairs(examples: list[dict], idx: list[int], pad_id: int) -> dict:
    """Encoded pairs idx -> a right-padded batch whose consecutive rows are each pair's chosen and
    rejected response (0::2 chosen, 1::2 rejected)."""
    prompts, responses = [], []
    for i in idx:
        for k in ("chosen", "rejected"):
            prompts.append(examples[i]["prompt"])
            responses.append(examples[i][k])
    return collate_right(prompts, responses, pad_id)


def collate_left(prompts: list[list[int]], pad_id: int) -> dict:
    """Generation batch: prompts left-padded so that every row's next token is at column P."""
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def response_mask(response_len: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) float mask, 1 on the first response_len_b entries of each row."""
    return (torch.arange(length, device=response_len.device)[None, :] < response_len[:, None]).float()


def tau_prefix(examples: list[tuple[list[int], list[int]]], prompt_len: int, response_len: int) -> list[int]:
    """The τ prefix (docs/algorithm.md §8): K (prompt ids, response ids) pairs, each prompt cut from
    the left to prompt_len tokens and each response from the right to response_len, concatenated
    in order (a response keeps its EOS unless cut, which marks where each trajectory ends)."""
    return [t for p, r in examples for t in p[max(len(p) - prompt_len, 0):] + r[:response_len]]
