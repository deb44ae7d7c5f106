"""scripts/real_scale.py — issue 18's memory targets on a real model, measured on a CPU: SmolLM2-135M-Instruct
(vocabulary 49,152; `python scripts/smollm2.py` makes it), one thread, every run a fresh process under
/usr/bin/time -v ("Maximum resident set size": the whole process, glibc's default malloc), one at a time.

  1. Data (out/real_scale/): long-answer chat prompts (prompts.jsonl, 700: the held-out split is
     min(--eval_prompts, 10 %)) and preference pairs of ~512 tokens (pairs32.jsonl, pairs4.jsonl = its first 4,
     pairs_eval.jsonl = 2): chat prompts, synthetic ~470-token responses.
  2. A GVM and a reward model trained for one step on 4 pairs (the GVM is measurement gvm_b4 itself), so that
     dvpo.py and ppo_baseline.py can run.
  3. The measurements (RUNS): dvpo.py and ppo_baseline.py at 256 new tokens, batch 4 vs 16 and held-out
     prompts 4 vs 16 at fixed micro-batch sizes; dvpo.py at 192 new tokens, batch 16, 64 held-out prompts;
     gvm.py at batch 4 vs 32 pairs, micro-batch 4. Each writes out/real_scale/<name>/; peaks go to results.json
     and a markdown table (docs/performance.md, "Real scale (issue 18)").

  OMP_NUM_THREADS=1 python scripts/real_scale.py                         # data, then every run not yet done
  OMP_NUM_THREADS=1 python scripts/real_scale.py --only dvpo_b4_e4,dvpo_b4_e16
  python scripts/real_scale.py --table                                   # the table of what results.json holds
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL = os.path.join(os.environ.get("DVPO_CACHE", os.path.expanduser("~/.cache/dvpo-minimal")), "smollm2-135m-instruct")
OUT = "out/real_scale"
TOPICS = ["the history of Rome", "how vaccines work", "the water cycle", "black holes", "the French revolution",
          "machine learning", "photosynthesis", "the stock market", "plate tectonics", "the human immune system",
          "climate change", "the printing press", "quantum computing", "ancient Egypt", "the internet",
          "renewable energy", "the Renaissance", "how airplanes fly", "the Cold War", "DNA replication",
          "coral reefs", "the industrial revolution", "volcanoes", "the Roman empire's economy", "jazz music",
          "the solar system", "antibiotics", "the Silk Road", "electric cars", "the theory of evolution",
          "honey bees", "the Great Depression", "nuclear fusion", "the Amazon rainforest", "medieval castles"]
ASKS = ["Write a very long, detailed essay about {t}, with many sections.",
        "Explain {t} in great depth, step by step, in at least 2000 words.",
        "Give a comprehensive lecture on {t}. Cover every aspect at length.",
        "Write a long textbook chapter on {t} with examples and details.",
        "Describe {t} thoroughly: background, mechanisms, consequences, open questions.",
        "I need an extremely detailed report on {t}. Be as long and complete as you can.",
        "Tell me everything you know about {t}, in a long and well organised answer.",
        "Write a long story that teaches a child about {t}, with many chapters.",
        "Write an in-depth guide to {t} for a university student, with many paragraphs.",
        "Compose a lengthy article about {t} with an introduction, ten sections and a conclusion.",
        "Explain {t} to a curious adult, slowly and in great detail, without leaving anything out.",
        "Write a long FAQ about {t} with at least thirty detailed questions and answers.",
        "Write a detailed history and explanation of {t}, as long as possible.",
        "Produce a long set of lecture notes on {t}, with definitions, examples and exercises.",
        "Write a long encyclopedia entry about {t}.",
        "Discuss {t} at length from several points of view.",
        "Write an exhaustive overview of {t}, section by section.",
        "Write a long blog post about {t} with many details and anecdotes.",
        "Teach me about {t} as thoroughly as you can, in a very long answer.",
        "Write a long, detailed explanation of {t} with many concrete examples."]
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their been has more when will would who so if out up into do "
         "time only new some could these two may first then any like now my such make over our even most made "
         "after also did many before must through back years where much your way well down should because each "
         "just those people how too little state good very world still own see men work long here between both "
         "life being under never day same another know while last might us great old year off come since against "
         "go came right used take three system water river energy light small large city country history story").split()


def synthetic_response(rng: random.Random, tok, n_tokens: int) -> str:
    """Sentences of common words until the text is n_tokens long (SmolLM2's tokenizer)."""
    text = ""
    while len(tok(text)["input_ids"]) < n_tokens:
        text += " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 18))).capitalize() + ". "
    return text.strip()


def write_data():
    """prompts.jsonl (700 long-answer chat prompts), pairs32/pairs4/pairs_eval.jsonl (~512-token pairs)."""
    from transformers import AutoTokenizer  # optional here: only the data writer needs it
    os.makedirs(OUT, exist_ok=True)
    rows = [{"prompt": [{"role": "user", "content": a.format(t=t)}]} for t in TOPICS for a in ASKS]
    with open(os.path.join(OUT, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tok, rng = AutoTokenizer.from_pretrained(SMOL), random.Random(0)
    pairs = [{**rows[i * 7], "chosen": synthetic_response(rng, tok, 470), "rejected": synthetic_response(rng, tok, 470)}
             for i in range(34)]
    for name, part in (("pairs32", pairs[:32]), ("pairs4", pairs[:4]), ("pairs_eval", pairs[32:])):
        with open(os.path.join(OUT, name + ".jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


def rl(script: str, value: str, batch: int, eval_prompts: int, tokens: int, epochs: int, eval_batch: int = 4) -> list:
    return [script, "--model", SMOL, *value.split(), "--prompts", f"{OUT}/prompts.jsonl", "--steps", "1",
            "--max_new_tokens", str(tokens), "--batch_size", str(batch), "--minibatch_size", "4",
            "--micro_batch_size", "4", "--ppo_epochs", str(epochs), "--eval_prompts", str(eval_prompts),
            "--eval_batch_size", str(eval_batch), "--lr", "1e-6", "--save_every", "0"]


def value(script: str, pairs: str, batch: int, max_len: int = 512) -> list:
    return [script, "--model", SMOL, "--data", f"{OUT}/{pairs}.jsonl", "--eval_data", f"{OUT}/pairs_eval.jsonl",
            "--epochs", "1", "--batch_size", str(batch), "--micro_batch_size", "4", "--lr", "1e-4",
            "--warmup_steps", "1", "--max_response_len", str(max_len)]


GVM, RM = f"--gvm {OUT}/gvm_b4", f"--reward rm:{OUT}/rm"
# batch 4: 2 epochs, so that AdamW's state exists during a later minibatch as it does at batch 16 (4 minibatches)
RUNS = {"gvm_b4": value("gvm.py", "pairs4", 4), "rm": value("reward_model.py", "pairs4", 4, 64),
        "dvpo_b4_e4": rl("dvpo.py", GVM, 4, 4, 256, 2), "dvpo_b4_e16": rl("dvpo.py", GVM, 4, 16, 256, 2),
        "dvpo_b16_e4": rl("dvpo.py", GVM, 16, 4, 256, 1),
        "ppo_b4_e4": rl("ppo_baseline.py", RM, 4, 4, 256, 2), "ppo_b4_e16": rl("ppo_baseline.py", RM, 4, 16, 256, 2),
        "ppo_b16_e4": rl("ppo_baseline.py", RM, 16, 4, 256, 1),
        "dvpo_192_b16_e64": rl("dvpo.py", GVM, 16, 64, 192, 1, 64),
        "gvm_b32": value("gvm.py", "pairs32", 32)}


def measure(name: str) -> dict:
    """One run under /usr/bin/time -v, one thread; its peak RSS, wall time and the script's own peak."""
    out_dir = os.path.join(OUT, name)
    cmd = ["/usr/bin/time", "-v", sys.executable, *RUNS[name], "--out_dir", out_dir]
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    log_text = open(os.path.join(out_dir, "log.txt")).read()
    if p.returncode:
        sys.exit(f"{name} failed (exit {p.returncode}): see {out_dir}/log.txt")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log_text).group(1))
    res = {"cmd": "python " + " ".join(RUNS[name]).replace(SMOL, "$SMOL"), "max_rss_gib": rss_kb / 2**20,
           "wall_s": time.time() - t0}
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics):  # the step's own peak (VmHWM so far), and how long the responses ran
        last = [json.loads(line) for line in open(metrics)][-1]
        res.update({k: last[k] for k in ("memory/peak_gb", "response_len", "truncated") if k in last})
    return res


def table(results: dict) -> str:
    out = ["| run | command (`$SMOL` = the SmolLM2 folder; `--out_dir out/real_scale/<run>`) | peak RSS (GiB) | "
           "response length, truncated | wall (s) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        resp = f"{r['response_len']:.0f}, {r['truncated']:.2f}" if "response_len" in r else ""
        out.append(f"| {name} | `{r['cmd']}` | {r['max_rss_gib']:.2f} | {resp} | {r['wall_s']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated run names (default: all not yet in results.json)")
    ap.add_argument("--table", action="store_true", help="only print the table of results.json")
    args = ap.parse_args()
    os.chdir(ROOT)
    path = os.path.join(OUT, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    if not args.table:
        if not os.path.exists(os.path.join(OUT, "pairs_eval.jsonl")):
            write_data()
        for name in (args.only.split(",") if args.only else [n for n in RUNS if n not in results]):
            results[name] = measure(name)
            r = results[name]
            print(f"{name}: peak RSS {r['max_rss_gib']:.2f} GiB, {r['wall_s']:.0f} s", flush=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    print(table(results))
