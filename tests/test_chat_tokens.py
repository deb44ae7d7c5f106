"""A chat model whose end-of-turn token is not its tokenizer's EOS (Qwen2.5's tokenizer EOS is
<|endoftext|>, its turns end with <|im_end|>): the end-of-turn token is the last SFT target, any of
EOS / end of turn / generation_config.eos_token_id ends a sampled response in rollout and
evaluation, and gvm.py --explain scores chat prompts through the template. Built from the char
tokenizer, no download."""
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel, GenerationConfig

import checkpoint
import data
import evaluation
import gvm
import model as mdl
import task

CHATML = ("{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")


@pytest.fixture
def chat_tok():
    """The char tokenizer (EOS </s>, id 1) plus a special <|im_end|> that ends every chat turn and a
    special <|eot|> that a model may list in its generation_config only."""
    tok = task.build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|eot|>"]})
    tok.chat_template = CHATML
    return tok


def im_end(tok):
    return tok.convert_tokens_to_ids("<|im_end|>")


def test_end_of_turn_and_stop_tokens(chat_tok):
    eot = im_end(chat_tok)
    assert eot not in (chat_tok.eos_token_id, chat_tok.unk_token_id)
    assert data.end_of_turn_id(chat_tok) == eot
    assert data.stop_token_ids(chat_tok) == sorted([chat_tok.eos_token_id, eot])
    # generation_config.eos_token_id joins the set, as an int or a list
    assert data.stop_token_ids(chat_tok, GenerationConfig(eos_token_id=[eot, 7])) == sorted([1, 7, eot])
    assert data.stop_token_ids(chat_tok, GenerationConfig(eos_token_id=9)) == sorted([1, 9, eot])
    assert data.stop_token_ids(chat_tok, GenerationConfig()) == sorted([1, eot])
    # no template, a template ending turns with EOS, a template with nothing special after a turn: EOS
    plain = task.build_char_tokenizer()
    assert data.end_of_turn_id(plain) == plain.eos_token_id and data.stop_token_ids(plain) == [1]
    plain.chat_template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    assert data.end_of_turn_id(plain) == plain.eos_token_id
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert data.end_of_turn_id(plain) == plain.eos_token_id
    # a template change is seen (the memo is keyed on the template too)
    chat_tok.chat_template = plain.chat_template
    assert data.end_of_turn_id(chat_tok) == chat_tok.eos_token_id


def test_sft_targets_end_with_the_end_of_turn_token(chat_tok):
    """Template applied once, the prompt masked, the end-of-turn token (not EOS) the last target,
    and prompt ⊕ response is exactly the templated conversation up to that token."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    p, r = data.encode_prompt(chat_tok, msgs), data.encode_response(chat_tok, "5")
    full = chat_tok(chat_tok.apply_chat_template(msgs + [{"role": "assistant", "content": "5"}], tokenize=False),
                    add_special_tokens=False)["input_ids"]
    assert p + r == full[:len(p) + len(r)] and full[len(p) + len(r):] == chat_tok("\n")["input_ids"]
    assert r == chat_tok("5", add_special_tokens=False)["input_ids"] + [im_end(chat_tok)]
    assert chat_tok.eos_token_id not in p + r
    # what sft.py trains on: targets gathered at P-1.. are exactly the response, the mask covers only them
    batch = data.collate_right([p, p[:5]], [r, r], chat_tok.pad_token_id)
    T = int(batch["response_len"].max())
    targets = mdl.gather_response(batch["input_ids"], batch["prompt_len"], T)
    mask = data.response_mask(batch["response_len"], T)
    assert targets[0].tolist() == r and targets[1].tolist() == r and mask.sum().item() == 2 * len(r)
    assert targets[0, -1].item() == im_end(chat_tok)
    assert data.decode_response(chat_tok, r + [5, 6]) == "5"  # cut at the end-of-turn token


class ScriptLM(torch.nn.Module):
    """A fake causal LM: the next token is (current token + 1), except after token `after` it is
    `emit`. It carries a generation_config, as a transformers model does."""

    def __init__(self, after: dict, vocab: int, stop_ids):
        super().__init__()
        self.after, self.vocab = after, vocab
        self.generation_config = GenerationConfig(eos_token_id=stop_ids)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                logits_to_keep=0):
        nxt = (input_ids + 1) % self.vocab
        for a, e in self.after.items():
            nxt = torch.where(input_ids == a, torch.full_like(input_ids, e), nxt)
        logits = torch.zeros(*input_ids.shape, self.vocab).scatter(-1, nxt[..., None], 10.0)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:], cache=cache)


def test_rollout_and_evaluation_stop_at_every_stop_token(chat_tok):
    """Row 0 reaches the end-of-turn token, row 1 a token listed only in generation_config, row 2 the
    tokenizer's EOS, row 3 none of them (truncated). Before, only EOS stopped a response."""
    eot, cfg_stop = im_end(chat_tok), chat_tok.convert_tokens_to_ids("<|eot|>")
    model = ScriptLM({20: eot, 40: cfg_stop, 80: chat_tok.eos_token_id}, len(chat_tok), [eot, cfg_stop])
    prompts = [[18], [38], [78], [10]]
    b = mdl.rollout(model, prompts, chat_tok, 6, 0.0, 1.0, None, "cpu")
    assert mdl.responses(b) == [[19, 20, eot], [39, 40, cfg_stop], [79, 80, 1], [11, 12, 13, 14, 15, 16]]
    assert b["truncated"].tolist() == [False, False, False, True]
    seen = []

    def reward(prompt, response):  # records what the evaluation reward is shown
        seen.append(response)
        return float(len(response))
    ev = evaluation.evaluate_policy(model, None, chat_tok, [chat_tok.decode([18]), chat_tok.decode([38])], "cpu", 0, 6,
                            reward, temperature=0.0)
    assert ev["response_len"] == 3 and ev["reward"] == 2.0  # two characters before the stop token
    assert seen == [chat_tok.decode([19, 20]), chat_tok.decode([39, 40])] * 2  # sampled, then greedy
    # min_new_tokens (bench.py) masks every stop token
    b = mdl.rollout(model, [[18]], chat_tok, 5, 0.0, 1.0, None, "cpu", min_new_tokens=5)
    assert not set(mdl.responses(b)[0]) & {eot, cfg_stop, 1}


@pytest.fixture
def chat_gvm(chat_tok, tmp_path):
    """A GVM folder (tiny backbone, zero head made non-zero) whose gvm_config says it was trained on chat prompts."""
    path = str(tmp_path / "lm")
    lm = task.build_tiny_model(chat_tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    lm.save_pretrained(path)
    chat_tok.save_pretrained(path)
    model = mdl.ValueModel(AutoModel.from_pretrained(path))
    torch.nn.init.normal_(model.value_head.weight, generator=torch.Generator().manual_seed(0))
    out = str(tmp_path / "gvm")
    checkpoint.save_value_model(model, chat_tok, out, gvm.GVM_CONFIG, {"tau_k": 0, "chat_prompts": True})
    return out


def explain(capsys, path, **kw):
    gvm.main(gvm.Config(explain=True, gvm=path, response="42", device="cpu", **kw))
    return capsys.readouterr().out


def scored_tokens(out: str) -> list[str]:
    line = next(l for l in out.splitlines() if "tokens scored:" in l)
    return eval(line.split("tokens scored: ", 1)[1])  # the printed python list of token strings


def test_explain_scores_chat_prompts_through_the_template(chat_tok, chat_gvm, capsys):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 6*7?"}]
    out = explain(capsys, chat_gvm, messages=json.dumps(msgs))
    assert "chat template" in out
    assert scored_tokens(out) == chat_tok.convert_ids_to_tokens(data.encode_prompt(chat_tok, msgs))
    rows = [l.split() for l in out.splitlines() if l.strip()[:1].isdigit()]
    assert [r[1] for r in rows] == ["'4'", "'2'", "'<|im_end|>'"]  # the response, then its end-of-turn token
    # a plain --prompt is one user message when the GVM was trained on chat prompts: same tokens, same values
    user_only = [{"role": "user", "content": "What is 6*7?"}]
    a, b = explain(capsys, chat_gvm, prompt="What is 6*7?"), explain(capsys, chat_gvm, messages=json.dumps(user_only))
    assert "--prompt as a user message" in a
    expected = chat_tok.convert_ids_to_tokens(data.encode_prompt(chat_tok, user_only))
    assert scored_tokens(a) == scored_tokens(b) == expected
    assert a.split("tokens scored:")[1] == b.split("tokens scored:")[1]
    # a GVM trained on plain prompts reads --prompt as plain text
    cfg_path = f"{chat_gvm}/{gvm.GVM_CONFIG}"
    json.dump({"tau_k": 0, "chat_prompts": False}, open(cfg_path, "w"))
    out = explain(capsys, chat_gvm, prompt="What is 6*7?")
    assert "plain text" in out and scored_tokens(out) == list("What is 6*7?")
    with pytest.raises(data.DataError, match="--messages: invalid JSON"):
        explain(capsys, chat_gvm, messages="[{")
    with pytest.raises(data.DataError, match="--messages"):
        explain(capsys, chat_gvm, messages='[{"role": "user"}]')
