"""data.py: file formats and their errors, exact token boundaries, collation and response-aligned
indexing (docs/algorithm.md §1), the built-in task, and sampling."""
import json
import math
import random
import string
from types import SimpleNamespace

import pytest
import torch

import data
import model as mdl
import task


def write_jsonl(tmp_path, records, name="f.jsonl"):
    """records: dicts (dumped as JSON) or raw strings (written as the line verbatim)."""
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def write_array(tmp_path, records, name="f.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=2))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def tok():
    return task.build_char_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    tk = task.build_char_tokenizer()
    model = task.build_tiny_model(tk, seed=0)
    model.eval()
    return model, tk


# ----------------------------------------------------------------------------------------------
# Formats: every accepted form parses, from JSONL and from a JSON array

FORMAT_CASES = [
    ("preference", {"prompt": "2+2=", "chosen": "4", "rejected": "5", "policy": "sft"},
     {"prompt": "2+2=", "chosen": "4", "rejected": "5", "policy": "sft"}),
    ("preference", {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
     {"prompt": "2+2=", "chosen": "4", "rejected": "5", "policy": None}),
    # UltraFeedback-binarized: the context messages become the prompt
    ("preference", {"prompt": "hi", "chosen": [user("hi"), assistant("a")], "rejected": [user("hi"), assistant("b")]},
     {"prompt": [user("hi")], "chosen": "a", "rejected": "b", "policy": None}),
    # HH-RLHF: full transcripts, split at the last "\n\nAssistant:"
    ("preference", {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
     {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " a", "rejected": " b", "policy": None}),
    ("preference", {"chosen": "\n\nHuman: hi\n\nAssistant: x\n\nHuman: more\n\nAssistant: a",
                    "rejected": "\n\nHuman: hi\n\nAssistant: x\n\nHuman: more\n\nAssistant: b", "policy": "p0"},
     {"prompt": "\n\nHuman: hi\n\nAssistant: x\n\nHuman: more\n\nAssistant:", "chosen": " a", "rejected": " b",
      "policy": "p0"}),
    # the released DVPO code's format: response_j is the preferred one
    ("preference", {"question": "q?", "response_j": "good", "response_k": "bad"},
     {"prompt": "q?", "chosen": "good", "rejected": "bad", "policy": None}),
    ("scored", {"prompt": "p", "response": "r", "score": 3, "policy": "rl"},
     {"prompt": "p", "response": "r", "score": 3.0, "policy": "rl"}),
    ("scored", {"prompt": "p", "response": [user("u"), assistant("r")], "score": -0.5},
     {"prompt": [user("u")], "response": "r", "score": -0.5, "policy": None}),
    ("prompt", {"prompt": "p"}, {"prompt": "p"}),
    ("prompt", {"prompt": [user("u")]}, {"prompt": [user("u")]}),
    ("prompt", {"messages": [user("u")]}, {"prompt": [user("u")]}),
    ("sft", {"prompt": "p", "response": "r"}, {"prompt": "p", "response": "r"}),
    ("sft", {"messages": [user("u"), assistant("a1"), user("v"), assistant("a2")]},
     {"prompt": [user("u"), assistant("a1"), user("v")], "response": "a2"}),
]


@pytest.mark.parametrize("kind,record,expected", FORMAT_CASES)
def test_formats_parse_from_jsonl_and_json_array(tmp_path, kind, record, expected):
    path = write_jsonl(tmp_path, [record, "", record])  # a blank line is ignored
    rows, stats = data.load_records(path, kind)
    assert rows == [expected, expected]
    assert (stats.read, stats.kept, stats.skipped) == (2, 2, [])
    rows, stats = data.load_records(write_array(tmp_path, [record, record, record]), kind)
    assert rows == [expected] * 3 and stats.kept == 3


# ----------------------------------------------------------------------------------------------
# Bad records: DataError naming file, line and field; skip_bad counts them

GOOD = {"preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "scored": {"prompt": "p", "response": "r", "score": 1.0},
        "prompt": {"prompt": "p"},
        "sft": {"prompt": "p", "response": "r"}}

BAD_CASES = [  # (kind, raw line 3, field named in the message or None, extra text in the message)
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": ', None, "invalid JSON"),
    ("preference", '{"prompt": "p", "chosen": "a"}', "rejected", "missing"),
    ("preference", '{"prompt": "p", "chosen": 5, "rejected": "b"}', "chosen", "int"),
    ("preference", '{"prompt": "p", "chosen": "  ", "rejected": "b"}', "chosen", "empty"),
    ("preference", '{"prompt": 7, "chosen": "a", "rejected": "b"}', "prompt", "int"),
    ("preference", '{"prompt": "p", "chosen": "same", "rejected": "same"}', "chosen", "identical"),
    ("preference", '{"question": "q", "response_j": "x", "response_k": "x"}', "response_j", "identical"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": "b", "policy": 3}', "policy", "int"),
    ("preference", json.dumps({"prompt": "p", "chosen": [user("p"), assistant("a")],
                               "rejected": [user("p"), user("b")]}), "rejected", "assistant"),
    ("preference", json.dumps({"prompt": "p", "chosen": [user("p"), assistant("a")],
                               "rejected": [user("other"), assistant("b")]}), "rejected", "context"),
    ("preference", json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a",
                               "rejected": "\n\nHuman: bye\n\nAssistant: b"}), "rejected", "differs"),
    ("preference", json.dumps({"chosen": "no turns here", "rejected": "b"}), "prompt", "missing"),
    ("preference", json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: b"}),
     "chosen", "empty"),
    ("preference", '["not", "an", "object"]', None, "JSON object"),
    ("scored", '{"prompt": "p", "response": "r", "score": NaN}', "score", "finite"),
    ("scored", '{"prompt": "p", "response": "r", "score": Infinity}', "score", "finite"),
    ("scored", '{"prompt": "p", "response": "r", "score": -Infinity}', "score", "finite"),
    ("scored", '{"prompt": "p", "response": "r", "score": "1.0"}', "score", "finite"),
    ("scored", '{"prompt": "p", "response": "r", "score": true}', "score", "finite"),
    ("scored", '{"prompt": "p", "response": "", "score": 1}', "response", "empty"),
    ("prompt", '{"messages": []}', "messages", "non-empty"),
    ("prompt", '{"prompt": [{"role": "user"}]}', "prompt", "content"),
    ("sft", json.dumps({"messages": [user("u"), user("v")]}), "messages", "assistant"),
    ("sft", json.dumps({"messages": [assistant("a")]}), "messages", "before"),
    ("sft", '{"prompt": "p", "response": ["r"]}', "response", "role"),
    ("sft", '{"prompt": "p"}', "response", "missing"),
]


@pytest.mark.parametrize("kind,line,field,extra", BAD_CASES)
def test_bad_record_names_file_line_and_field(tmp_path, kind, line, field, extra):
    path = write_jsonl(tmp_path, [GOOD[kind], GOOD[kind], line, GOOD[kind]])
    with pytest.raises(data.DataError) as e:
        data.load_records(path, kind)
    msg = str(e.value)
    assert f"{path}:3" in msg, msg
    assert extra in msg, msg
    if field is not None:
        assert f"'{field}'" in msg, msg
    rows, stats = data.load_records(path, kind, skip_bad=True)
    assert len(rows) == 3
    assert (stats.read, stats.kept, len(stats.skipped)) == (4, 3, 1)
    assert f"{path}:3" in stats.skipped[0] and "skipped 1" in stats.summary()


def test_bad_item_in_json_array_names_item(tmp_path):
    path = write_array(tmp_path, [GOOD["sft"], {"prompt": "p", "response": 1}])
    with pytest.raises(data.DataError, match=r"f\.json: item 1: field 'response'"):
        data.load_records(path, "sft")
    bad = tmp_path / "g.json"
    bad.write_text('[\n{"prompt": "p",\n "response": }\n]')
    with pytest.raises(data.DataError, match=r"g\.json:3"):
        data.load_records(str(bad), "sft")


def test_skip_bad_counts_every_record(tmp_path):
    lines = [GOOD["preference"], "{oops", {"prompt": "p", "chosen": "a"}, "", GOOD["preference"],
             {"prompt": "p", "chosen": "x", "rejected": "x"}, GOOD["preference"]]
    path = write_jsonl(tmp_path, lines)
    with pytest.raises(data.DataError, match=r"f\.jsonl:2"):
        data.load_records(path, "preference")
    rows, stats = data.load_records(path, "preference", skip_bad=True)
    assert len(rows) == 3 and stats.read == 6 and stats.kept == 3
    assert [s.split(": ")[0] for s in stats.skipped] == [f"{path}:{n}" for n in (2, 3, 6)]


def test_no_usable_records_raises(tmp_path):
    path = write_jsonl(tmp_path, ["{bad", {"prompt": "p"}])
    with pytest.raises(data.DataError, match="no usable"):
        data.load_records(path, "sft", skip_bad=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(data.DataError, match="no usable"):
        data.load_records(str(empty), "prompt")
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_records(str(tmp_path / "missing.jsonl"), "prompt")


# ----------------------------------------------------------------------------------------------
# Tokenization: exact boundaries, truncation, chat templates, save/load

def test_prompt_response_boundaries_exact(tok):
    p, r = data.encode_prompt(tok, "52817:"), data.encode_response(tok, "12578")
    assert len(p) == 6 and len(r) == 6
    assert tok.eos_token_id not in p
    assert r[-1] == tok.eos_token_id and r.count(tok.eos_token_id) == 1
    assert tok.decode(p + r[:-1]) == "52817:12578"
    assert tok.decode(p) == "52817:" and tok.decode(r[:-1]) == "12578"
    assert data.decode_response(tok, r + [5, 6]) == "12578"  # cut at the first EOS
    assert data.decode_response(tok, r[:-1]) == "12578"


def test_truncation_sides_and_counts(tok):
    stats = data.TruncationStats()
    p = data.encode_prompt(tok, "52817:", max_len=3, stats=stats)
    assert tok.decode(p) == "17:"  # cut from the left: the end of the prompt stays
    r = data.encode_response(tok, "12578", max_len=3, stats=stats)
    assert tok.decode(r) == "125" and tok.eos_token_id not in r  # cut from the right: EOS is lost
    assert (stats.prompts_cut, stats.responses_cut) == (1, 1)
    assert len(data.encode_prompt(tok, "52817:", max_len=6, stats=stats)) == 6
    assert data.encode_response(tok, "12578", max_len=6, stats=stats)[-1] == tok.eos_token_id
    assert (stats.prompts_cut, stats.responses_cut) == (1, 1)  # exact fits are not counted
    assert "1 prompts" in stats.summary() and "1 responses" in stats.summary()


def bos_char_tokenizer():
    """The char tokenizer plus a BOS that the tokenizer adds itself ("<s> $A </s>"), to check that
    special tokens are neither doubled (chat templates) nor left at the end (EOS) of a prompt."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
    for c in ["\t", "\n"] + [chr(i) for i in range(32, 127)]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 3), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")


TEMPLATE = ("{% if bos_token %}{{ bos_token }}{% endif %}"
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_string_prompt_keeps_bos_drops_eos():
    tk = bos_char_tokenizer()
    assert tk("ab")["input_ids"] == [3, vocab_id(tk, "a"), vocab_id(tk, "b"), 1]
    assert data.encode_prompt(tk, "ab") == [3, vocab_id(tk, "a"), vocab_id(tk, "b")]


def vocab_id(tk, c):
    return tk.convert_tokens_to_ids(c)


@pytest.mark.parametrize("make", [task.build_char_tokenizer, bos_char_tokenizer])
def test_chat_prompt_uses_template_without_doubled_special_tokens(make):
    tk = make()
    msgs = [user("hi"), assistant("yo"), user("sort 321")]
    tk.chat_template = TEMPLATE
    ids = data.encode_prompt(tk, msgs)
    text = "<user>hi\n<assistant>yo\n<user>sort 321\n<assistant>"
    expected = tk(text, add_special_tokens=False)["input_ids"]
    if tk.bos_token_id is not None:
        expected = [tk.bos_token_id] + expected
    assert ids == expected
    assert ids.count(tk.eos_token_id) == 0
    if tk.bos_token_id is not None:
        assert ids.count(tk.bos_token_id) == 1  # the template's BOS, not a second one from the tokenizer


def test_chat_prompt_without_template_uses_fallback(tok):
    assert not tok.chat_template
    ids = data.encode_prompt(tok, [user("hi"), assistant("yo"), user("x")])
    assert tok.decode(ids) == "user: hi\nassistant: yo\nuser: x\nassistant:"
    assert data.encode_prompt(tok, [user("hi")], max_len=4) == ids[-4:]


def test_tokenizer_save_load_roundtrip(tok, tmp_path):
    from transformers import AutoTokenizer
    tok.save_pretrained(str(tmp_path))
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok2.pad_token_id, tok2.eos_token_id, tok2.unk_token_id) == (0, 1, 2)
    assert len(tok2) == len(tok) == 100
    text = "".join(chr(i) for i in range(32, 127)) + "\t\n" + "a  b\n\n c"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids  # one token per character
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids
    assert tok2.decode(ids) == text and tok.decode(ids) == text
    rng = random.Random(0)
    for _ in range(20):
        s = "".join(rng.choice(string.printable[:-3]) for _ in range(rng.randint(1, 30)))  # no \r \x0b \x0c
        assert tok2.decode(tok2(s, add_special_tokens=False)["input_ids"]) == s
    assert data.encode_prompt(tok2, "52817:") == data.encode_prompt(tok, "52817:")
    assert data.encode_response(tok2, "12578") == data.encode_response(tok, "12578")


# ----------------------------------------------------------------------------------------------
# Collation and response-aligned indexing

ROWS = [("52817:", "12578"), ("9:", "9"), ("1234567:", "1234567x")]


def encoded(tk, rows=ROWS):
    return [data.encode_prompt(tk, p) for p, _ in rows], [data.encode_response(tk, r) for _, r in rows]


def left_layout(prompts, responses, pad_id):
    """Rollout layout: prompts left-padded to P, then responses right-padded; prompt_len = P."""
    left = data.collate_left(prompts, pad_id)
    P, T = left["input_ids"].shape[1], max(map(len, responses))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, r in enumerate(responses):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return {"input_ids": torch.cat([left["input_ids"], ids], 1),
            "attention_mask": torch.cat([left["attention_mask"], mask], 1),
            "prompt_len": torch.full((len(prompts),), P), "response_len": torch.tensor([len(r) for r in responses])}


def test_collate_shapes_and_padding_sides(tok):
    prompts, responses = encoded(tok)
    b = data.collate_right(prompts, responses, tok.pad_token_id)
    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    assert b["input_ids"].shape == b["attention_mask"].shape == (3, max(lens))
    assert b["prompt_len"].tolist() == [6, 2, 8] and b["response_len"].tolist() == [6, 2, 9]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert b["input_ids"][i, :lens[i]].tolist() == p + r
        assert (b["input_ids"][i, lens[i]:] == tok.pad_token_id).all()
        assert b["attention_mask"][i].tolist() == [1] * lens[i] + [0] * (max(lens) - lens[i])
    left = data.collate_left(prompts, tok.pad_token_id)
    assert left["input_ids"].shape == (3, 8)
    for i, p in enumerate(prompts):
        assert left["input_ids"][i, 8 - len(p):].tolist() == p
        assert (left["input_ids"][i, :8 - len(p)] == tok.pad_token_id).all()
        assert left["attention_mask"][i].tolist() == [0] * (8 - len(p)) + [1] * len(p)
    assert mdl.position_ids(left["attention_mask"])[1].tolist() == [0] * 6 + [0, 1]
    assert data.response_mask(torch.tensor([2, 0, 3]), 3).tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]


def test_gather_response_hand_example():
    x = torch.arange(10).view(1, 10)
    assert mdl.gather_response(x, torch.tensor([3]), 4).tolist() == [[3, 4, 5, 6]]
    assert mdl.gather_response(x, torch.tensor([8]), 4).tolist() == [[8, 9, 9, 9]]  # clamped at the end


@pytest.mark.parametrize("trailing", [(), (3,)])
def test_value_chain_gather_is_padding_invariant(trailing):
    """w_k = u[P-1+k], k = 0..T, read per row the same from a right-padded and a left-padded batch,
    and equal to a python loop over the unpadded rows."""
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 6), (2, 2), (8, 9), (1, 4)]  # (P_b, T_b)
    vals = [torch.randn(p + t, *trailing, generator=g) for p, t in shapes]  # u per real position of z_b
    B, Pm, Tm = len(shapes), max(p for p, _ in shapes), max(t for _, t in shapes)
    right = torch.full((B, max(p + t for p, t in shapes), *trailing), 1e9)
    left = torch.full((B, Pm + Tm, *trailing), -1e9)
    for b, (p, t) in enumerate(shapes):
        right[b, :p + t] = vals[b]
        left[b, Pm - p:Pm + t] = vals[b]
    P = torch.tensor([p for p, _ in shapes])
    w_right = mdl.gather_response(right, P - 1, Tm + 1)
    w_left = mdl.gather_response(left, torch.full((B,), Pm) - 1, Tm + 1)
    mask = data.response_mask(torch.tensor([t for _, t in shapes]) + 1, Tm + 1)
    for b, (p, t) in enumerate(shapes):
        loop = torch.stack([vals[b][p - 1 + k] for k in range(t + 1)])
        assert torch.equal(w_right[b, :t + 1], loop)
        assert torch.equal(w_left[b, :t + 1], loop)
        assert mask[b].sum() == t + 1
    m = mask.view(B, Tm + 1, *([1] * len(trailing))).bool().expand_as(w_right)
    assert torch.equal(w_right[m], w_left[m])


def test_response_logprobs_padding_invariant(tiny):
    model, tk = tiny
    prompts, responses = encoded(tk)
    with torch.no_grad():
        alone = []
        for p, r in zip(prompts, responses):
            b = data.collate_right([p], [r], tk.pad_token_id)
            logp, ent = mdl.response_logprobs(model, b, len(r), with_entropy=True)
            # index convention: y_t sits at P+t-1 and is scored by the logits at P+t-2
            z = torch.tensor([p + r])
            lsm = torch.log_softmax(model(input_ids=z).logits.float()[0], -1)
            P = len(p)
            ref = torch.stack([lsm[P + t - 2, z[0, P + t - 1]] for t in range(1, len(r) + 1)])
            torch.testing.assert_close(logp[0], ref, atol=1e-5, rtol=0)
            ref_ent = torch.stack([-(lsm[P + t - 2].exp() * lsm[P + t - 2]).sum() for t in range(1, len(r) + 1)])
            torch.testing.assert_close(ent[0], ref_ent, atol=1e-5, rtol=0)
            alone.append(logp[0])
        T = max(map(len, responses))
        right, _ = mdl.response_logprobs(model, data.collate_right(prompts, responses, tk.pad_token_id), T)
        left, _ = mdl.response_logprobs(model, left_layout(prompts, responses, tk.pad_token_id), T)
    for i, r in enumerate(responses):
        torch.testing.assert_close(right[i, :len(r)], alone[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(left[i, :len(r)], alone[i], atol=1e-5, rtol=0)
    assert (right[0] - right[1]).abs().max() > 1e-3  # rows really differ: the check is not vacuous


def test_response_logprobs_temperature(tiny):
    model, tk = tiny
    prompts, responses = encoded(tk)
    b = data.collate_right(prompts, responses, tk.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        logp, _ = mdl.response_logprobs(model, b, 6, temperature=2.0)
    lsm = torch.log_softmax(logits[0, 5:11] / 2.0, -1)
    torch.testing.assert_close(logp[0], lsm.gather(-1, b["input_ids"][0, 6:12, None])[:, 0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# The built-in task

def test_gold_reward_hand_checked():
    assert task.builtin_target("52817:") == "12578"
    assert task.gold_reward("52817:", "12578") == 1.0
    assert task.gold_reward("52817:", "12579") == pytest.approx(0.8)
    assert task.gold_reward("52817:", "125789") == pytest.approx(5 / 6)  # too long: divided by |y|
    assert task.gold_reward("52817:", "125") == pytest.approx(3 / 5)  # too short: divided by |t|
    assert task.gold_reward("52817:", "") == 0.0
    assert task.gold_reward("52817:", "12a78") == pytest.approx(0.8)
    assert task.gold_reward("52817:", "1257 8") == pytest.approx(4 / 6)
    assert task.gold_reward("52817:", "87521") == pytest.approx(1 / 5)  # only the middle 5 is in place


def test_builtin_prompts_deterministic_and_splits_disjoint():
    a = task.builtin_prompts(300, "train", seed=0)
    assert a == task.builtin_prompts(300, "train", seed=0)
    assert a != task.builtin_prompts(300, "train", seed=1)
    e = task.builtin_prompts(300, "eval", seed=0)
    assert not set(a) & set(e)
    assert not set(task.builtin_prompts(300, "train", seed=1)) & set(task.builtin_prompts(300, "eval", seed=2))
    for p in a + e:
        assert p.endswith(":") and p[:-1].isdigit() and 4 <= len(p) - 1 <= 7
    assert len(set(len(p) for p in a)) == 4
    with pytest.raises(ValueError):
        task.builtin_prompts(1, "test")


def test_builtin_demo_deterministic_and_error_structure():
    prompts = task.builtin_prompts(50)
    assert [task.builtin_demo(p, random.Random(3)) for p in prompts] == \
           [task.builtin_demo(p, random.Random(3)) for p in prompts]
    rng = random.Random(0)
    n, counts = 3000, {"7->1": 0, "7->7": 0, "d->d": 0, "d": 0}
    for _ in range(n):
        y = task.builtin_demo("0777722:", rng)  # target "0227777": four 7s, three other digits
        t = task.builtin_target("0777722:")
        assert len(y) == len(t) and y.isdigit()
        for a, b in zip(t, y):
            if a == "7":
                counts["7->1"] += b == "1"
                counts["7->7"] += b == "7"
            else:
                counts["d"] += 1
                counts["d->d"] += a == b
    n7 = 4 * n
    # P(7 -> 1) = 0.6 * (1 - 0.25) + 0.25 / 10 = 0.475; P(7 -> 7) = 0.4 * 0.75 + 0.025 = 0.325
    assert abs(counts["7->1"] / n7 - 0.475) < 0.02
    assert abs(counts["7->7"] / n7 - 0.325) < 0.02
    # any other digit: P(kept) = 0.75 + 0.025 = 0.775
    assert abs(counts["d->d"] / counts["d"] - 0.775) < 0.02
    assert task.builtin_demo("52817:", random.Random(0), error=0.0, confusion=("7", "1", 0.0)) == "12578"
    assert task.builtin_demo("777:", random.Random(0), error=0.0, confusion=("7", "1", 1.0)) == "111"


def test_builtin_sft_data():
    rows = task.builtin_sft_data(40, seed=0)
    assert rows == task.builtin_sft_data(40, seed=0)
    assert [r["prompt"] for r in rows] == task.builtin_prompts(40, "train", 0)
    mean = sum(task.gold_reward(r["prompt"], r["response"]) for r in rows) / len(rows)
    assert 0.4 < mean < 0.9  # flawed demonstrations, well below 1


def test_bt_label_frequency():
    rng = random.Random(0)
    for ga, gb, t in [(1.0, 0.0, 0.1), (0.6, 0.4, 0.2), (0.3, 0.3, 1.0), (0.0, 1.0, 0.5)]:
        p = 1 / (1 + math.exp(-(ga - gb) / t))
        freq = sum(task.bt_label(ga, gb, t, rng) for _ in range(4000)) / 4000
        assert abs(freq - p) < 0.03, (ga, gb, t, freq, p)


# ----------------------------------------------------------------------------------------------
# Sampling

class CounterLM(torch.nn.Module):
    """A fake causal LM for generate(): the next token is (current token + 1), except after `stop`
    it is EOS. Rows can then be made to end at a chosen step."""

    def __init__(self, vocab=100, stop=12, eos=1):
        super().__init__()
        self.vocab, self.stop, self.eos, self.calls = vocab, stop, eos, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                logits_to_keep=0):
        self.calls += 1
        nxt = torch.where(input_ids == self.stop, torch.full_like(input_ids, self.eos), (input_ids + 1) % self.vocab)
        logits = torch.zeros(*input_ids.shape, self.vocab).scatter(-1, nxt[..., None], 10.0)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:], cache=cache)


def test_generate_eos_padding_lengths_truncation():
    m = CounterLM()
    ids = torch.tensor([[0, 9, 10], [5, 6, 3], [0, 0, 12]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    out, length, truncated = mdl.generate(m, ids, mask, 6, eos_id=1, pad_id=0, temperature=0.0)
    assert out.tolist() == [[11, 12, 1, 0, 0, 0], [4, 5, 6, 7, 8, 9], [1, 0, 0, 0, 0, 0]]
    assert length.tolist() == [3, 6, 1]  # counts the EOS
    assert truncated.tolist() == [False, True, False]
    # all rows finished: generation stops early
    out, length, truncated = mdl.generate(m, ids[[0, 2]], mask[[0, 2]], 10, eos_id=1, pad_id=0, temperature=0.0)
    assert out.tolist() == [[11, 12, 1], [1, 0, 0]] and length.tolist() == [3, 1] and not truncated.any()
    # min_new_tokens masks EOS until then
    out, length, _ = mdl.generate(m, ids[:1], mask[:1], 5, eos_id=1, pad_id=0, temperature=0.0, min_new_tokens=4)
    assert 1 not in out[0, :4].tolist()


def test_generate_greedy_deterministic_and_padding_invariant(tiny):
    model, tk = tiny
    prompts = [data.encode_prompt(tk, p) for p in ["52817:", "1234567:", "9:"]]
    alone = []
    for p in prompts:
        enc = data.collate_left([p], tk.pad_token_id)
        out, length, trunc = mdl.generate(model, enc["input_ids"], enc["attention_mask"], 12, tk.eos_token_id,
                                           tk.pad_token_id, temperature=0.0)
        out2, _, _ = mdl.generate(model, enc["input_ids"], enc["attention_mask"], 12, tk.eos_token_id,
                                   tk.pad_token_id, temperature=0.0)
        assert torch.equal(out, out2)
        alone.append((out[0, :length[0]].tolist(), bool(trunc[0])))
        # the KV-cache rollout equals a full recomputation at every step (greedy)
        seq = p + out[0, :length[0]].tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0]
        assert logits[len(p) - 1:len(seq) - 1].argmax(-1).tolist() == seq[len(p):]
    enc = data.collate_left(prompts, tk.pad_token_id)
    out, length, trunc = mdl.generate(model, enc["input_ids"], enc["attention_mask"], 12, tk.eos_token_id,
                                       tk.pad_token_id, temperature=0.0)
    for i, (ys, tr) in enumerate(alone):
        assert out[i, :length[i]].tolist() == ys and bool(trunc[i]) == tr
        assert (out[i, length[i]:] == tk.pad_token_id).all()
    assert len(set(tuple(ys) for ys, _ in alone)) > 1  # different prompts, different responses


def test_sample_token_top_p_and_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    s = mdl.sample_token(logits, 1.0, 0.7, g)  # nucleus {0, 1}: 0.5 < 0.7 <= 0.8
    counts = torch.bincount(s, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 20000 - 0.625) < 0.02  # renormalised 0.5 / 0.8
    s = mdl.sample_token(logits, 1.0, 1.0, g)
    freq = torch.bincount(s, minlength=4).float() / 20000
    assert (freq - probs).abs().max() < 0.015 and freq[3] > 0
    s = mdl.sample_token(logits, 1.0, 0.4, g)
    assert (s == 0).all()
    assert mdl.sample_token(torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]]), 0.0, 1.0).tolist() == [1, 0]
    low_t = mdl.sample_token(logits[:2000], 0.05, 1.0, g)  # sharpened to near-greedy
    assert (low_t == 0).float().mean() > 0.99


def test_builtin_pairs(tiny):
    model, tk = tiny
    prompts = task.builtin_prompts(16, "train", seed=0)
    rows, same = task.builtin_pairs(model, tk, prompts, "T1.0", "sft", 0.1, seed=0)
    assert isinstance(same, int) and len(rows) + same == len(prompts) and len(rows) > 0
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "policy", "gold_chosen", "gold_rejected"}
        assert r["policy"] == "sft" and r["prompt"] in prompts
        assert r["chosen"] != r["rejected"] and r["chosen"] and r["rejected"]
        assert r["gold_chosen"] == task.gold_reward(r["prompt"], r["chosen"])
        assert r["gold_rejected"] == task.gold_reward(r["prompt"], r["rejected"])
    assert task.builtin_pairs(model, tk, prompts, "T1.0", "sft", 0.1, seed=0) == (rows, same)


def test_non_utf8_line_is_a_data_error_with_its_line(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\xff\xfe\n')
    with pytest.raises(data.DataError, match=r"bin\.jsonl:2: not valid UTF-8"):
        data.load_records(str(p), "preference")
    rows, stats = data.load_records(str(p), "preference", skip_bad=True)
    assert len(rows) == 1 and stats.read == 2 and len(stats.skipped) == 1


def test_check_context_names_the_options():
    from transformers import LlamaConfig
    data.check_context(512, LlamaConfig(max_position_embeddings=512), "x")  # fits: no error
    with pytest.raises(data.DataError, match="more than the model's context of 512.*--max_prompt_len"):
        data.check_context(513, LlamaConfig(max_position_embeddings=512), "prompt + response")


def test_parse_sampler_and_late_slips():
    assert task.parse_sampler("T1.0") == (1.0, 0.0) and task.parse_sampler("T1.5+late0.25") == (1.5, 0.25)
    for bad in ("1.0", "T", "Tx", "T1.0+latey"):
        with pytest.raises(ValueError, match="sampler"):
            task.parse_sampler(bad)
    rng = random.Random(0)
    prompt = "9876543:"  # 7 digits: the second half starts at position ceil(7/2) = 4
    assert task.late_slips(prompt, "3456789", 0.0, rng) == "3456789"
    slipped = [task.late_slips(prompt, "3456789", 1.0, rng) for _ in range(200)]
    assert all(y[:4] == "3456" and len(y) == 7 and y[4:].isdigit() for y in slipped)  # early digits never slip
    assert len({y[4:] for y in slipped}) > 50  # late ones are redrawn
    assert all(task.late_slips(prompt, "3456789", 1.0, rng, start=6)[:6] == "345678" for _ in range(20))  # a prefix


def test_sample_builtin_continues_prefixes(tiny):
    model, tk = tiny
    prompts = task.builtin_prompts(6, "eval")
    prefixes = ["1", "12", "", "9", "00", "5"]
    g = torch.Generator().manual_seed(0)
    ys = task.sample_builtin(model, tk, prompts, "T1.0+late1.0", g, random.Random(0), prefixes)
    assert all(y.startswith(x) for x, y in zip(prefixes, ys))
    plain = task.sample_builtin(model, tk, prompts, "T1.0", torch.Generator().manual_seed(0), random.Random(0))
    reference = mdl.sample_texts(model, tk, prompts, 16, 1.0, 1.0, 256, torch.Generator().manual_seed(0))
    assert plain == reference  # a plain sampler is exactly temperature sampling
