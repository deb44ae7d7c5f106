"""The sentiment example (examples/sentiment) with the real SmolLM2-135M-Instruct on a handful of prompts,
each script run as its README runs it: make_data.py -> gvm.py (one step) -> token_credit.py. Checked: the
files are well-formed and load through data.py, training records never carry a score, the gold file agrees
with VADER, held-out topics never appear in a training pair, the labels follow Bradley-Terry, the token ->
word rule of token_credit.py on a hand-made reply, and a bad flag is one line.

No download here: without the converted model folder (`python3 scripts/smollm2.py --no-check`) the model
tests skip, or fail when DVPO_REQUIRE_REAL_MODEL=1, exactly like tests/test_real_model.py.
Cost: about 2 minutes on one CPU thread, mostly loading and saving the 135M-parameter model.
"""
import json
import math
import os
import subprocess
import sys

import pytest

import data
import model as mdl
from examples.sentiment import compare, make_data
from examples.sentiment.reward import valence, vader
from tests.test_real_model import numbers  # every number in a JSON-like value
from examples.sentiment.token_credit import reply_tokens, token_valence, token_words, word_spans

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
N_PAIRS, N_EVAL = 4, 2


def run(args, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if ok:
        assert p.returncode == 0, f"{' '.join(args)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def made(smol, tmp_path_factory):
    """make_data.py on a handful of prompts, one gvm.py step on its pairs, token_credit.py on the GVM."""
    d = tmp_path_factory.mktemp("sentiment")
    run(["examples/sentiment/make_data.py", "--model", smol, "--out_dir", str(d), "--n_pairs", str(N_PAIRS),
         "--n_eval_pairs", str(N_EVAL), "--max_new_tokens", "8", "--batch_size", "4"])
    run(["gvm.py", "--model", smol, "--data", str(d / "prefs.jsonl"), "--eval_data", str(d / "prefs_eval.jsonl"),
         "--out_dir", str(d / "gvm"), "--epochs", "1", "--batch_size", "4", "--lr", "1e-5", "--warmup_steps", "1",
         "--max_prompt_len", "64", "--max_response_len", "16", "--log_every", "1"])
    run(["examples/sentiment/token_credit.py", "--gvm", str(d / "gvm"), "--rm", "", "--data",
         str(d / "gold_pairs.jsonl"), "--out", str(d / "token_credit.json"), "--figure", str(d / "credit.png"),
         "--scatter", ""])
    return d


def test_vader_and_valence():
    for text in ("", "A stapler.", "What a wonderful, great, lovely day!", "Awful. Terrible. I hate queues."):
        g = vader("any prompt", text)
        assert isinstance(g, float) and -1.0 <= g <= 1.0
    assert vader(None, "What a wonderful day!") > 0.5 > -0.5 > vader(None, "An awful, terrible day.")
    assert valence("great,") > 0 > valence("Awful!") and valence("stapler") == 0.0


def test_labels_follow_bradley_terry():
    """label_pairs (no model): a tiny t makes the label the gold order; a huge one a coin flip; the same seed
    gives the same labels; the preference records carry no number at all."""
    prompts = [make_data.chat(f"Describe item {i}.", "") for i in range(200)]
    texts = [t for _ in prompts for t in ("A wonderful, lovely, great thing.", "A thing.")]
    cfg = make_data.Config(bt_temperature=1e-3)
    prefs, gold, dropped = make_data.label_pairs(prompts, texts, "train", cfg, "p")
    assert dropped == 0 and len(prefs) == 200 and all(g["gold_chosen"] > g["gold_rejected"] for g in gold)
    assert not any(numbers(p) for p in prefs)
    cfg.bt_temperature = 1e3
    _, gold, _ = make_data.label_pairs(prompts, texts, "train", cfg, "p")
    wins = sum(g["gold_chosen"] > g["gold_rejected"] for g in gold)
    assert 70 < wins < 130  # ~Binomial(200, ½)
    assert make_data.label_pairs(prompts, texts, "train", cfg, "p")[1] == gold
    _, _, dropped = make_data.label_pairs(prompts[:1], ["same", "same"], "train", cfg, "p")
    assert dropped == 1


def test_topics_are_split_by_hash():
    prompts = make_data.all_prompts()
    assert all(prompts.values()) and sum(map(len, prompts.values())) == 9 * 150
    for kind, topics in make_data.TOPICS.items():
        for topic in topics:
            split = make_data.split_of(topic)
            for t in make_data.TEMPLATES[kind]:
                assert t.format(x=topic) in prompts[split]


def test_files_are_well_formed_and_carry_no_score(made, smol):
    d = made
    prompts = read(d / "prompts.jsonl")
    assert len(prompts) == len(make_data.all_prompts()["rl"])
    assert all(set(r) == {"messages"} and r["messages"][-1]["role"] == "user" for r in prompts)
    data.load_records(str(d / "prompts.jsonl"), "prompt")
    train, held = read(d / "prefs.jsonl"), read(d / "prefs_eval.jsonl")
    assert 0 < len(train) <= N_PAIRS and 0 < len(held) <= N_EVAL
    for r in train + held:
        assert set(r) == {"prompt", "chosen", "rejected", "policy"}, r
        assert r["chosen"][:-1] == r["prompt"] == r["rejected"][:-1] and r["chosen"][-1]["role"] == "assistant"
        assert not numbers(r), r  # the training files never see a score
    for name in ("prefs.jsonl", "prefs_eval.jsonl"):
        rows, stats = data.load_records(str(d / name), "preference")
        assert stats.kept == stats.read and not stats.skipped
    gold = read(d / "gold_pairs.jsonl")
    assert [g["split"] for g in gold] == ["train"] * len(train) + ["eval"] * len(held)
    for g, r in zip(gold, train + held):
        assert g["chosen"] == r["chosen"][-1]["content"] and g["rejected"] == r["rejected"][-1]["content"]
        assert g["gold_chosen"] == vader(g["prompt"], g["chosen"]) and g["gold_rejected"] == vader(None, g["rejected"])
    split_of = {p: split for split, ps in make_data.all_prompts().items() for p in ps}  # topics split by hash
    assert {split_of[r["prompt"][-1]["content"]] for r in train} == {"train"}
    assert {split_of[r["prompt"][-1]["content"]] for r in held} == {"eval"}
    assert {split_of[r["messages"][-1]["content"]] for r in prompts} == {"rl"}
    stats = json.load(open(d / "data_stats.json"))
    assert all(math.isfinite(v) for v in numbers(stats["train"]) + numbers(stats["eval"]))
    assert 0.0 <= stats["eval"]["label_accuracy"] <= 1.0 and stats["train"]["sampling"]["tokens_per_s"] > 0


def test_gvm_and_token_credit_run_on_the_pairs(made):
    d = made
    s = json.load(open(d / "gvm" / "summary.json"))
    assert s["train/steps"] == 1 and s["eval/pairs"] == len(read(d / "prefs_eval.jsonl"))
    assert 0.0 <= s["eval/pairwise_accuracy"] <= 1.0
    tc = json.load(open(d / "token_credit.json"))
    assert tc["replies"] == 2 * tc["pairs"] and set(tc["GVM"]) >= {"token_last", "token_all", "word"}
    assert tc["GVM"]["token_last"]["n"] > 0 and os.path.getsize(d / "credit.png") > 0


def test_tokens_map_to_vader_words(smol):
    """The token that holds a word's last character carries its valence ("last"), every token of it
    ("all"); punctuation VADER strips is not part of a word; the ids are the ones training reads."""
    tok = mdl.load_tokenizer(smol)
    text = "It is wonderful, (great!) but awful...\nNo un-happy end."
    ids, offsets = reply_tokens(tok, text)
    assert ids == data.encode_response(tok, text)[:-1]
    spans = word_spans(text)
    assert [text[s:e] for s, e, _ in spans] == ["It", "is", "wonderful", "great", "but", "awful", "No",
                                                "un-happy", "end"]
    members = token_words(offsets, spans)
    last, every = token_valence(len(ids), spans, members, "last"), token_valence(len(ids), spans, members, "all")
    pieces = [text[s:e] for s, e in offsets]
    assert {pieces[t]: last[t] for t in range(len(ids)) if last[t]} == {
        " wonderful": valence("wonderful"), "great": valence("great"), " awful": valence("awful"), "No": valence("no")}
    assert last == every  # each lexicon word here is one token
    assert len(members[7]) > 1 and all(every[t] == 0 for t in members[7])  # "un-happy": not in the lexicon


def test_a_bad_flag_is_one_line():
    p = run(["examples/sentiment/make_data.py", "--samples", "3"], ok=False)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and p.stderr.startswith("make_data.py: --samples")


def test_compare_reads_runs_and_counts_words():
    """compare.py's pure pieces: --runs labels give method and β; a reply's statistics count VADER's
    positive and negative lexicon words as VADER reads them (punctuation stripped), distinct words, "!"."""
    assert compare.parse_runs("dvpo_b0.03=out/a,grpo_b0.1=out/b") == [("dvpo_b0.03", "out/a", "dvpo", 0.03),
                                                                       ("grpo_b0.1", "out/b", "grpo", 0.1)]
    for bad in ("dvpo=out/a", "dvpo_bx=out/a", "out/a"):
        with pytest.raises(compare.tu.ConfigError):
            compare.parse_runs(bad)
    s = compare.reply_stats("Great, great day! A sad stapler.")
    assert s["positive_words"] == 2 and s["negative_words"] == 1 and s["exclamations"] == 1
    assert s["words"] == 6 and s["distinct"] == 5 / 6 and s["vader"] == vader(None, "Great, great day! A sad stapler.")
    assert compare.top_positive(["great fun", "fun"]) == [("fun", 2), ("great", 1)]
    m, se = compare.mean_se([1.0, 3.0])
    assert m == 2.0 and se == 1.0
