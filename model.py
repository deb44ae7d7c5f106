"""model.py — everything that reads numbers off a model: the value model (the GVM, the reward model
and the PPO critic share its shape), loading policies and value models (sharded under torchrun),
response log-probs, the value chain, and rollouts sampled with a KV cache.

Positions (docs/algorithm.md §1). A row is z = x ⊕ y: the prompt x fills positions 0..P-1, the
response y_1..y_T fills P..P+T-1 (y_t is at P-1+t). Logits at position i score z_{i+1}; a value
model emits one scalar u_i per position, a function of z_0..z_i only. For P = 3, T = 3:

    position i              0     1     2     3     4     5
    token z_i              x_1   x_2   x_3   y_1   y_2   y_3 (EOS)
    log π(y_t|s_t), t =                1     2     3     –       read at P+t-2  (response_logprobs)
    chain w_k = u_{P-1+k}, k =         0     1     2     3       (value_chain)
    V(s_t) = w_{t-1}, t =              1     2     3     –       read at P+t-2  (the critic, `td`)

  w_0 = V(prompt), w_k = Q(s_k, a_k) for k ≥ 1, and the terminal entry w_T ≈ r(x, y).
Every function here returns response-aligned tensors — (B, T) per token, (B, T+1) for the chain —
gathered per row from its own offset, so left and right padding give the same numbers.

  1. Loading: load_policy (a hub id or a local path), ValueModel = causal-LM backbone + nn.Linear(H, 1),
     new_value_model / load_value_model (checkpoint.save_value_model writes one), value_scale (§7),
     chance_warning (is its held-out accuracy above chance?).
     Every loader returns the model on its device, sharded under torchrun (fsdp_utils.on_device:
     rank 0 reads, the others receive only their shards), with dropout off (disable_dropout) and
     buffers (rotary inv_freq) in the dtype the model built them in; a value head is always fp32.
  2. Reading: gather_response, last_index / terminal, value_chain, terminal_values, response_logprobs,
     frozen_logprobs. Memory is bounded by a micro-batch: logits exist only at response positions
     (logits_to_keep), log-softmax runs in fp32 chunks, frozen forwards loop over micro-batches, and no
     training or scoring forward builds a KV cache.
  3. Sampling: sample_token, generate (KV cache, cut at the first stop token), rollout (the layout
     every loss reads), responses, sample_texts.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import data
import fsdp_utils as fu
import train_utils as tu

BATCH_KEYS = ("input_ids", "attention_mask", "prompt_len", "response_len")  # what a training forward reads
LOGITS_CHUNK = 2**26  # fp32 log-softmax elements per chunk (256 MiB): rows × positions × vocabulary

# ----------------------------------------------------------------------------------------------
# 1. Loading policies and value models


def load_tokenizer(path: str):
    """AutoTokenizer with a pad token (the EOS token when the tokenizer has none)."""
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    """--frozen_dtype: the dtype of the frozen models (reference, GVM, reward model). auto = bfloat16
    on CUDA (half the memory; their forwards compute in bf16 anyway) and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16"):
        raise tu.ConfigError(f"--frozen_dtype must be auto, float32 or bfloat16, got {name!r}")
    return getattr(torch, name)


def hf_model(path: str, dtype: torch.dtype, meta: bool, cls=AutoModelForCausalLM):
    """The HF model at `path` in `dtype`: loaded (from_pretrained), or, on the meta device, the same
    modules built from its config, with the generation settings from_pretrained would read."""
    if not meta:
        return cls.from_pretrained(path, dtype=dtype)
    model = cls.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: from_pretrained keeps the default from the config too
            pass
    return model


def disable_dropout(module: nn.Module) -> nn.Module:
    """Every dropout probability of a model set to 0, in place (the saved config is unchanged). RL needs
    deterministic forwards: the old and new log-probs, the reference and a GVM's TD targets of one
    batch must be the same function of the weights, or step-0 KL and clipfrac are dropout noise.
    Covers nn.Dropout modules and float attributes named *dropout* (HF attention passes them to SDPA)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(m, name, 0.0)
    return module


def load_policy(path: str, device="cpu", dtype=torch.float32, frozen: bool = False):
    """(model, tokenizer) from a hub id or a local path, on `device`, sharded under torchrun, dropout
    off. Trained: fp32, the master weights (bf16 compute comes from FSDP's policy on CUDA); frozen
    (the reference): in dtype (see frozen_dtype). The built-in task's tiny model: task.load_tiny_policy."""
    return fu.on_device(lambda meta: disable_dropout(hf_model(path, dtype, meta)), device, frozen), load_tokenizer(path)


def enable_gradient_checkpointing(trained: nn.Module):
    """Recompute each decoder block's activations in the backward instead of keeping them (HF's gradient
    checkpointing, non-reentrant: the variant FSDP2 supports). For a ValueModel, on its backbone."""
    hf = trained.backbone if isinstance(trained, ValueModel) else trained
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class ValueModel(nn.Module):
    """Causal-LM backbone (AutoModel, no LM head) + nn.Linear(H, 1): one scalar per position.
    forward -> u: (B, L). The GVM, the Bradley-Terry reward model and the PPO critic. The head is fp32
    whatever the backbone's dtype (under FSDP2 it is its own unit with an fp32 policy): DVPO's signal is
    the per-token increment w_t - w_{t-1}, which bf16 (steps of 2⁻⁸ near 1) would round to zero."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)  # starts at 0 everywhere: no prior on the values
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                          use_cache=False).last_hidden_state  # (B, L, H)
        return self.value_head(h.float()).squeeze(-1)  # (B, L), fp32


FP32_MODULES = ("value_head",)  # fsdp_utils.shard gives these their own fp32 FSDP2 unit


def new_value_model(path: str, device="cpu", dtype=torch.float32, frozen: bool = False) -> ValueModel:
    """A value model whose backbone starts from a causal LM (e.g. the SFT policy), head at zero, dropout
    off, on `device`, sharded under torchrun; backbone trained: fp32 (frozen: in dtype); head fp32."""
    return fu.on_device(lambda meta: disable_dropout(ValueModel(hf_model(path, dtype, meta, AutoModel))), device,
                        frozen, FP32_MODULES)


def load_value_model(path: str, config_name: str, hint: str, device="cpu", dtype=torch.float32,
                     frozen: bool = False):
    """(model, tokenizer, config) from a folder written by checkpoint.save_value_model: the backbone in
    HF format, value_head.safetensors and a JSON config named config_name (gvm_config.json,
    rm_config.json, critic_config.json). `hint` says how to make one when the folder is wrong.
    On `device`, sharded under torchrun; frozen (GVM, reward model): no gradients, in dtype."""
    for name in ("config.json", "value_head.safetensors", config_name):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: missing {name}; {hint}")

    def load(meta):
        vm = disable_dropout(ValueModel(hf_model(path, dtype, meta, AutoModel)))  # backbone in dtype, head fp32
        if not meta:
            vm.value_head.load_state_dict(load_file(os.path.join(path, "value_head.safetensors")))
        return vm

    with open(os.path.join(path, config_name)) as f:
        config = json.load(f)
    return fu.on_device(load, device, frozen, FP32_MODULES), load_tokenizer(path), config


REWARDS = {"rm": ("rm_config.json", "python reward_model.py"), "gvm": ("gvm_config.json", "python gvm.py")}


def parse_reward(spec: str) -> tuple[str, str]:
    """--reward rm:PATH | gvm:PATH -> (kind, path)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in REWARDS or not path:
        raise tu.ConfigError(f"--reward must be rm:PATH (a reward model) or gvm:PATH (a GVM), got {spec!r}")
    return kind, path


def load_reward(spec: str, device="cpu", dtype=torch.float32, frozen: bool = True):
    """The scorer of whole responses in the baselines, --reward rm:PATH | gvm:PATH: a value model read at
    each response's last token (terminal_values), a Bradley-Terry reward model's score or a GVM's
    terminal value w_T. (value model, tokenizer, config); frozen unless frozen=False (a critic's start)."""
    kind, path = parse_reward(spec)
    config_name, cmd = REWARDS[kind]
    vm, tok, config = load_value_model(path, config_name, f"train one with `{cmd}`", device, dtype, frozen)
    if kind == "gvm" and config.get("tau_k", 0):
        fu.print0(f"note: {path} was trained with tau_k={config['tau_k']}; as a sequence score it reads w_T without τ")
    return vm, tok, config


def value_scale(config: dict, normalize: bool, path: str) -> float:
    """The std of a value model's terminal value over its held-out responses, recorded when it was
    trained (docs/algorithm.md §7): RL divides w_T (or the RM score) by it. 1.0 when not normalizing."""
    if not normalize:
        return 1.0
    if "value_std" not in config:
        raise tu.ConfigError(f"{path}: its config has no value_std (trained before scale normalization); train it "
                             "again, or pass --normalize_reward false")
    if not math.isfinite(config["value_std"]) or config["value_std"] <= 0:
        raise tu.ConfigError(f"{path}: value_std is {config['value_std']}: its terminal value is the same for every "
                             "held-out response, so it ranks nothing; train it longer, or pass "
                             "--normalize_reward false")
    return float(config["value_std"])


def chance_warning(config: dict, path: str) -> str:
    """A warning, or "" if none: the value model's held-out pairwise accuracy, recorded when it was trained
    (gvm.py, reward_model.py on preference pairs), is within two standard errors of chance (0.5 ± 2·0.5/√n
    over n pairs). RL then follows noise, at unit size after the scale rule (§7): examples/arithmetic's DVPO
    went from 0.51 to 0.11 on a GVM at 0.50. Older models and score-trained ones record no accuracy: ""."""
    acc, n = config.get("eval/pairwise_accuracy"), config.get("eval/pairs")
    if acc is None or not n:
        return ""
    two_se = 2 * 0.5 / math.sqrt(n)
    if acc - 0.5 >= two_se:
        return ""
    return (f"warning: {path} ranked its {n} held-out pairs with accuracy {acc:.3f}, within two standard errors "
            f"of chance (0.5 + {two_se:.3f}); RL on it may follow noise: more pairs or steps first "
            "(docs/algorithm.md §7)")


# ----------------------------------------------------------------------------------------------
# 2. Reading numbers off a model: response-aligned slices, the value chain, log-probs

def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row is computed like an unpadded one. (B, L)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def gather_response(x: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """Per-row slice x[b, start_b : start_b + length] of a (B, L, ...) tensor -> (B, length, ...).
    Out-of-range positions are clamped; mask them with data.response_mask."""
    idx = (start[:, None] + torch.arange(length, device=x.device)[None, :]).clamp(0, x.shape[1] - 1)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid entry, (B, N) mask valid on a prefix -> (B,) (0 for an empty row)."""
    return (mask.sum(1).long() - 1).clamp(min=0)


def terminal(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last valid entry of each row: (B, N) -> (B,). On the chain's post-token entries w_1..w_T
    (x = w[:, 1:], mask (B, T)) this is w_T, the value model's estimate of r(x, y)."""
    return x.gather(1, last_index(mask)[:, None]).squeeze(1)


def value_chain(u: torch.Tensor, prompt_len: torch.Tensor, response_len: torch.Tensor, T: int | None = None):
    """Per-position values u (B, L) -> chain w (B, T+1) with w_k = u_{P-1+k}, and its mask
    (B, T+1) (1 on k = 0..T_b). P includes any τ prefix, so τ never enters the chain.
    w_0 = V(prompt), w_k = Q(s_k, a_k), w_T ≈ r(x, y) (docs/algorithm.md §1). T: the width (default:
    the longest response here; pass the rollout's T so that micro-batches line up)."""
    T = int(response_len.max()) if T is None else T  # CPU-GPU sync when T is not given
    return gather_response(u, prompt_len - 1, T + 1), data.response_mask(response_len + 1, T + 1)


def terminal_values(value_model, batch: dict) -> torch.Tensor:
    """w_T: a value model's value at each row's last response token, (B,) — the reward model's score
    r(x, y), or the GVM's estimate of it. batch: BATCH_KEYS, (B, L)."""
    u = value_model(batch["input_ids"], batch["attention_mask"]).float()  # (B, L)
    w, mask = value_chain(u, batch["prompt_len"], batch["response_len"])  # (B, T+1)
    return terminal(w, mask)


def _logprobs_chunk(logits: torch.Tensor, first: torch.Tensor, c: int, targets: torch.Tensor, temperature: float,
                    with_entropy: bool):
    """One chunk of c response positions: logits (B, K, V) in the model's dtype, first (B,) the chunk's
    first index in them, targets (B, c) -> log π (B, c) in fp32 and the entropy (B, c) (no gradient;
    None unless asked). Positions past a row's end are clamped (masked by the caller)."""
    chunk = gather_response(logits, first, c)  # (B, c, V)
    logp_all = F.log_softmax(chunk.float() / temperature, dim=-1)  # fp32 for this chunk only
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def response_logprobs(policy, batch: dict, T: int, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log π(y_t | s_t) for t = 1..T, response-aligned (B, T), and the entropy of π(· | s_t) (B, T) when
    with_entropy (for logging; no gradient). Logits at position i score token i+1, so y_t (at P+t-1) is
    scored at position P+t-2. Memory: the LM head runs only from the earliest scoring position on
    (logits_to_keep: exactly the T+1 last positions in the rollout layout, where every response starts
    at column P), and log-softmax runs in fp32 on chunks of at most LOGITS_CHUNK elements; with gradients
    each chunk is recomputed in the backward (checkpoint), so no fp32 (B, T, V) tensor is ever kept."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    start = batch["prompt_len"] - 1  # (B,) the position scoring y_1
    keep = ids.shape[1] - int(start.min())  # CPU-GPU sync (once per forward): positions the LM head scores
    logits = policy(input_ids=ids, attention_mask=am, position_ids=position_ids(am), logits_to_keep=keep,
                    use_cache=False).logits  # (B, keep, V): position L - keep + j at index j
    first = start - (ids.shape[1] - keep)  # (B,) index of y_1's scoring position in `logits`
    targets = gather_response(ids, start + 1, T)  # (B, T)
    B, V = ids.shape[0], logits.shape[-1]
    step = max(1, LOGITS_CHUNK // (B * V))  # response positions per chunk
    logps, entropies = [], []
    for t0 in range(0, T, step):
        c = min(step, T - t0)
        args = (logits, first + t0, c, targets[:, t0:t0 + c], temperature, with_entropy)
        if torch.is_grad_enabled():  # backward keeps only `logits` (shared by every chunk) and recomputes the rest
            logp, entropy = checkpoint(_logprobs_chunk, *args, use_reentrant=False)
        else:
            logp, entropy = _logprobs_chunk(*args)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps, 1), torch.cat(entropies, 1) if with_entropy else None


@torch.no_grad()
def frozen_logprobs(policy, batch: dict, T: int, temperature: float, micro_batch_size: int = 0) -> torch.Tensor:
    """log π(y_t | s_t) with no gradient, (B, T): the reference, or the policy before the update, in
    micro-batches of micro_batch_size rows (0: all at once). (no_grad, not inference_mode: under FSDP2
    inference_mode would turn the trained policy's gathered parameter buffers into inference tensors,
    which its next training step cannot update.)"""
    B = batch["input_ids"].shape[0]
    step = micro_batch_size or B
    out = [response_logprobs(policy, {k: batch[k][i:i + step] for k in BATCH_KEYS}, T, temperature)[0]
           for i in range(0, B, step)]
    fu.reshard(policy)  # FSDP2 keeps the root gathered after forward: free it
    return torch.cat(out)


@torch.no_grad()
def frozen_terminal_values(value_model, batch: dict, micro_batch_size: int = 0) -> torch.Tensor:
    """terminal_values with no gradient, in micro-batches of micro_batch_size rows (0: all at once): (B,)."""
    B = batch["input_ids"].shape[0]
    step = micro_batch_size or B
    out = [terminal_values(value_model, {k: batch[k][i:i + step] for k in BATCH_KEYS}) for i in range(0, B, step)]
    fu.reshard(value_model)  # FSDP2 keeps the root gathered after forward: free it
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# 3. Sampling with a KV cache

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
def generate(policy, input_ids, attention_mask, max_new_tokens: int, eos_id: int | list[int], pad_id: int,
             temperature: float = 1.0, top_p: float = 1.0, generator=None, min_new_tokens: int = 0):
    """Sample responses for left-padded prompts (B, P) with a KV cache. eos_id: the stop token, or a
    list of them (data.stop_token_ids); "EOS" below is any of them.
    Returns response ids (B, T) padded with pad_id after the first EOS, response_len (B,) counting
    the EOS, and truncated (B,) bool for rows that hit max_new_tokens without an EOS.
    min_new_tokens forces fixed-length generation (EOS is masked until then; used by bench.py)."""
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=input_ids.device)
    position = position_ids(attention_mask)
    out = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position, use_cache=True,
                 logits_to_keep=1)  # prefill: the logits of the last position only
    cache, logits = out.cache, out.logits[:, -1]
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
        if bool(done.all()):  # CPU-GPU sync, once per token
            break
        pos = pos + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = policy(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], cache=cache,
                     use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    return torch.stack(tokens, 1), length, ~done


@torch.no_grad()
def rollout(policy, prompt_ids: list[list[int]], tok, max_new_tokens: int, temperature: float, top_p: float,
            generator, device, min_new_tokens: int = 0) -> dict:
    """Sample one response per prompt. Layout: left-padded prompts (width P) ⊕ right-padded
    responses (width T), so every row's response starts at column P: prompt_len = P for all rows.
    Returns input_ids, attention_mask (B, P+T), prompt_len, response_len, truncated (B,),
    response (B, T) and the prompt ids."""
    enc = data.collate_left(prompt_ids, tok.pad_token_id)
    enc = {k: v.to(device) for k, v in enc.items()}
    stops = data.stop_token_ids(tok, getattr(policy, "generation_config", None))  # EOS, end of turn, the model's
    with fu.gathered(policy):  # eval mode, parameters gathered once for the whole rollout
        resp, resp_len, truncated = generate(policy, enc["input_ids"], enc["attention_mask"], max_new_tokens, stops,
                                             tok.pad_token_id, temperature, top_p, generator, min_new_tokens)
    B, P, T = resp.shape[0], enc["input_ids"].shape[1], resp.shape[1]
    return {"input_ids": torch.cat([enc["input_ids"], resp], 1),
            "attention_mask": torch.cat([enc["attention_mask"], data.response_mask(resp_len, T).long()], 1),
            "prompt_len": torch.full((B,), P, device=device), "response_len": resp_len,
            "truncated": truncated, "response": resp, "prompt_ids": prompt_ids}


def responses(batch: dict) -> list[list[int]]:
    """Each row's response ids without padding (EOS included when the row has one)."""
    return [r[:n].tolist() for r, n in zip(batch["response"], batch["response_len"])]


def sample_texts(policy, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 64, generator=None, device="cpu") -> list[str]:
    """Decoded responses for a list of prompts (strings or messages), in batches."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = data.collate_left([data.encode_prompt(tokenizer, p) for p in prompts[i:i + batch_size]],
                                tokenizer.pad_token_id)
        stops = data.stop_token_ids(tokenizer, getattr(policy, "generation_config", None))
        ids, _, _ = generate(policy, enc["input_ids"].to(device), enc["attention_mask"].to(device), max_new_tokens,
                             stops, tokenizer.pad_token_id, temperature, top_p, generator)
        out += [data.decode_response(tokenizer, row.tolist(), stops) for row in ids]
    return out
