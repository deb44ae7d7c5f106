"""reward_model.py — the Bradley-Terry reward model (RM) of the baselines: a causal-LM backbone + a
linear value head (the GVM's shape, model.ValueModel), trained offline on exactly the GVM's preference
pairs and split, then frozen for ppo_baseline.py (docs/algorithm.md §6). `diff gvm.py reward_model.py`
shows what differs: a Bradley-Terry loss at the last token instead of TD(λ) on the whole chain.

  1. u_i = head(h_i): one scalar per position; the score is the terminal entry of the value chain,
     r(x, y) = w_T = u_{P-1+T}, read at the last response token (no other entry is trained).
  2. Labels: y_chosen ≻ y_rejected (preference pairs only; no τ).
  3. Bradley-Terry loss: L = -log σ(r(x, y_chosen) - r(x, y_rejected)), a mean over the pairs of the
     global batch.
  4. Evaluation: held-out pairwise accuracy of r(chosen) > r(rejected); on the built-in task also the
     gold reward's own accuracy on the same noisy labels (the ceiling), and the return-to-go metric of
     gvm.py on the RM's per-prefix values (which BT never trains: the contrast to the GVM's chain).
  5. Scale (docs/algorithm.md §7): the mean and std of r over every held-out response, stored in
     rm_config.json; ppo_baseline.py divides the score by that std, so that β means the same for any RM.

Launch:
  python reward_model.py                         # built-in task: out/gvm's pairs -> out/rm
  python reward_model.py --data prefs.jsonl --model <sft path> --out_dir out/rm_real
  torchrun --nproc_per_node 8 reward_model.py --data prefs.jsonl --model <sft path>
  python reward_model.py --explain --rm out/rm --prompt "52817:" --response "12578"
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from tqdm import tqdm

import checkpoint
import data
import evaluation
import fsdp_utils as fu
import model
import train_utils as tu

RM_CONFIG = "rm_config.json"  # written beside the backbone: the reward kind, value scale, accuracy


@dataclass
class Config:
    model: str = "out/sft"  # backbone initialization: the SFT policy (hub id or path)
    data: str = ""  # preference JSONL/JSON file; empty = the GVM's pairs (out/gvm/pairs_train.jsonl, pairs_eval.jsonl)
    eval_data: str = ""  # held-out file of the same kind; empty = split eval_frac off --data
    eval_frac: float = 0.05
    out_dir: str = "out/rm"
    epochs: int = 2
    batch_size: int = 32  # pairs per optimizer step, global
    micro_batch_size: int = 32  # pairs per forward/backward on one rank; also evaluation
    gradient_checkpointing: bool = False
    grad_sync: str = "every"  # every: reduce-scatter each micro-batch's gradients | last: once per step (faster,
    #                            but an unsharded fp32 gradient of the trained model on every rank meanwhile)
    lr: float = 3e-4  # use ~2e-6 (paper App. A) for real models
    warmup_steps: int = 10
    grad_clip: float = 1.0
    max_prompt_len: int = 512
    max_response_len: int = 512
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    rtg_prompts: int = 256  # built-in task: held-out prompts per sampler of the return-to-go metric (0 = off)
    rtg_completions: int = 16  # Monte Carlo completions per prefix
    # explain mode
    explain: bool = False  # print per-token values of one response instead of training
    rm: str = "out/rm"  # explain: the trained reward model folder
    prompt: str = ""  # explain: the prompt text (a user message when the model was trained on chat prompts)
    messages: str = ""  # explain: the prompt as a JSON list of {role, content} messages (chat template)
    response: str = ""
    log_every: int = 20
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (this rank's GPU under torchrun)
    dist_timeout_min: float = 60  # how long a collective may wait for the other ranks


def load_rm(path: str, device="cpu", dtype=torch.float32, frozen: bool = False):
    """(value model, tokenizer, rm_config) of a trained reward model folder (model.load_value_model)."""
    return model.load_value_model(path, RM_CONFIG, "train one with `python reward_model.py`", device, dtype, frozen)


# ----------------------------------------------------------------------------------------------
# Pure functions: the Bradley-Terry loss (docs/algorithm.md §6); the score is model.terminal_values

def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, n_pairs) -> torch.Tensor:
    """Σ -log σ(r_c - r_r) / n_pairs over this rank's pairs, r_chosen, r_rejected: (B,). Only differences
    count, so a constant shift of r (the head's bias) is never learned: r's offset stays where it started.
    Loss convention: this rank's share of the global mean, Σ_local / n_pairs with n_pairs the pairs of
    the global batch (the caller backpropagates loss * world: DDP/FSDP average over ranks)."""
    return (-F.logsigmoid(r_chosen - r_rejected)).sum() / n_pairs


# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# The step: one optimizer step of Bradley-Terry on this rank's pairs of a global batch

def train_step(value_model, opt, examples: list[dict], idx: list[int], cfg: Config, step: int, total: int,
               pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on pairs idx, this rank's pairs of the step's global batch: the learning rate,
    the Bradley-Terry loss in micro-batches (gradient accumulation), clipping, the optimizer step. Returns
    this rank's summed loss shares and the gradient norm before clipping (0-d tensors: no host sync)."""
    world = fu.world()
    micro = min(cfg.micro_batch_size, cfg.batch_size // world)

    for g in opt.param_groups:
        g["lr"] = tu.lr_at(step, total, cfg.warmup_steps, cfg.lr)
    opt.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)  # Σ over micro-batches of this rank's loss shares
    for mi in range(0, len(idx), micro):
        fu.grad_sync(value_model, cfg.grad_sync == "every" or mi + micro >= len(idx))  # FSDP2 reduce-scatter
        batch = data.collate_pairs(examples, idx[mi:mi + micro], pad_id)
        batch = {key: v.to(device) for key, v in batch.items()}

        # Bradley-Terry at the last token: one forward over chosen and rejected rows
        r = model.terminal_values(value_model, batch)  # (2B,) chosen and rejected alternating
        loss = bt_loss(r[0::2], r[1::2], cfg.batch_size)  # a mean over the pairs of the global batch
        (loss * world).backward()  # DDP/FSDP average gradients over ranks: undo it
        step_loss += loss.detach()
    gnorm = fu.grad_norm_clip(value_model, cfg.grad_clip)  # all-reduce under FSDP2
    opt.step()
    return step_loss, gnorm


# ----------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(value_model, examples, pad_id, device, micro_batch_size: int) -> dict:
    """Held-out Bradley-Terry loss and pairwise accuracy of r(chosen) > r(rejected), overall and per
    sampling policy, and the scale statistic. Each rank scores its strided share of the pairs in
    micro-batches; the scores are all-gathered, so every rank returns the same numbers."""
    value_model.eval()
    per_example = {}  # example index -> [r(chosen), r(rejected)]
    for idx in evaluation.shard_batches(len(examples), micro_batch_size):
        batch = {k: v.to(device) for k, v in data.collate_pairs(examples, idx or [0], pad_id).items()}
        r = model.terminal_values(value_model, batch).tolist()  # CPU-GPU sync
        for j, i in enumerate(idx):  # (a dummy batch, idx == [], adds nothing)
            per_example[i] = r[2 * j:2 * j + 2]
    value_model.train()
    r = torch.tensor([s for pair in evaluation.gather_by_index(per_example) for s in pair])  # chosen, rejected, ...
    out = {"eval/bt_loss": bt_loss(r[0::2], r[1::2], len(examples)).item(),
           "eval/pairwise_accuracy": evaluation.pairwise_accuracy(r[0::2], r[1::2]),
           "eval/value_mean": r.double().mean().item(),
           "eval/value_std": r.double().std(unbiased=False).item()}  # the scale RL divides by (docs/algorithm.md §7)
    for pol in sorted({e["policy"] for e in examples if e["policy"] is not None}):
        sel = torch.tensor([e["policy"] == pol for e in examples])
        out[f"eval/pairwise_accuracy/{pol}"] = evaluation.pairwise_accuracy(r[0::2][sel], r[1::2][sel])
    out["eval/value_chosen_mean"] = r[0::2].mean().item()
    out["eval/value_rejected_mean"] = r[1::2].mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# Explain: per-token values (paper Figure 4)

def explain(cfg: Config):
    """--explain: the reward model's value at every token of one response (evaluation.explain); only the
    last one is trained."""
    device = fu.setup(cfg.device)
    value_model, tok, rcfg = load_rm(cfg.rm, device, frozen=True)
    prompt = evaluation.explain_prompt(cfg.prompt, cfg.messages, rcfg.get("chat_prompts", False))
    evaluation.explain(value_model, tok, prompt, cfg.response, device, bool(cfg.messages))


# ----------------------------------------------------------------------------------------------
# main: the recipe

def main(cfg: Config):
    if cfg.explain:
        return explain(cfg)
    device = fu.setup(cfg.device, cfg.dist_timeout_min)
    world = fu.world()
    tu.check_choice("grad_sync", cfg.grad_sync, ("every", "last"))
    if cfg.batch_size % world:  # every rank needs rows in every batch
        raise tu.ConfigError(f"--batch_size {cfg.batch_size} must be divisible by the {world} processes")
    tu.seed_everything(cfg.seed)  # the same on every rank
    metrics_path = tu.start_metrics(cfg.out_dir, vars(cfg))
    if cfg.model.startswith("out/") and not os.path.exists(cfg.model):
        sys.exit(f"reward_model.py: no SFT policy at {cfg.model!r}; run `python sft.py` first (or pass --model)")
    tok = model.load_tokenizer(cfg.model)

    # 1. data: preference pairs, the GVM's split
    train_rows, eval_rows = data.load_pairs(cfg.data, cfg.eval_data, cfg.skip_bad, cfg.eval_frac, cfg.seed)
    trunc = data.TruncationStats()
    train = data.encode_pairs(train_rows, tok, cfg.max_prompt_len, cfg.max_response_len, trunc)
    held = data.encode_pairs(eval_rows, tok, cfg.max_prompt_len, cfg.max_response_len, trunc)
    fu.print0(f"{len(train)} training and {len(held)} held-out preference rows; {trunc.summary()}")

    # 2. model: SFT backbone + zero-initialised value head
    value_model = model.new_value_model(cfg.model, device)  # FSDP2: sharded under torchrun
    prompt_max = max(len(e["prompt"]) for e in train + held)
    response_max = max(len(e[k]) for e in train + held for k in ("chosen", "rejected"))
    data.check_context(prompt_max + response_max, value_model.backbone.config, "prompt + response")
    value_model.train()
    opt = torch.optim.AdamW(value_model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(value_model)
    steps_per_epoch = len(train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if total == 0:
        raise data.DataError(f"{len(train)} training pairs is fewer than one batch of {cfg.batch_size}; "
                             "lower --batch_size")
    t0 = time.time()
    step = 0
    bar = tqdm(total=total, desc="rm", disable=fu.rank() != 0)
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        tu.python_rng(cfg.seed, "rm/order", epoch).shuffle(order)  # the same order on every rank
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size][fu.rank()::world]  # this rank's rows

            # 3. Bradley-Terry at the last token, chosen vs rejected (train_step)
            step_loss, gnorm = train_step(value_model, opt, train, idx, cfg, step, total, tok.pad_token_id, device)

            if step % cfg.log_every == 0 or step == total - 1:
                # the global loss is the sum of the ranks' shares: the mean over ranks of share × world
                m = fu.reduce_metrics({"train/bt_loss": step_loss * world, "train/grad_norm": gnorm}, device)
                m.update({"step": step, "epoch": epoch, "train/lr": opt.param_groups[0]["lr"],
                          "time/seconds": time.time() - t0})
                tu.append_jsonl(metrics_path, m)
                bar.set_postfix(bt_loss=f"{m['train/bt_loss']:.4f}")
            bar.update(1)
            step += 1
    bar.close()

    # 4. save first (an out-of-memory in the evaluation must not lose the trained model), then evaluate on
    #    held-out pairs; compare with the gold reward's own accuracy (built-in task)
    rcfg = {"reward": "bradley_terry",
            "chat_prompts": any(isinstance(r["prompt"], list) for r in train_rows)}  # --explain encodes alike
    checkpoint.save_value_model(value_model, tok, cfg.out_dir, RM_CONFIG, rcfg)  # a collective: rank 0 writes
    ev = evaluate(value_model, held, tok.pad_token_id, device, cfg.micro_batch_size)
    summary = {"train/pairs": len(train), "eval/pairs": len(held), "train/steps": total,
               "train/seconds": time.time() - t0, **ev}
    samplers = sorted({r["policy"].removeprefix("sft@") for r in eval_rows if r.get("policy")})
    if "gold_chosen" in eval_rows[0] and cfg.rtg_prompts > 0:  # built-in task: per-prefix values vs the truth
        policy = AutoModelForCausalLM.from_pretrained(cfg.model).to(device).eval()
        summary.update(evaluation.return_to_go(value_model, policy, tok, samplers, cfg.rtg_prompts,
                                               cfg.rtg_completions, 0, 0, 0, cfg.seed, device))
        del policy
    if "gold_chosen" in eval_rows[0]:  # built-in task: the ceiling, the gold reward's own accuracy
        summary.update(evaluation.gold_accuracy(eval_rows))
    # the scale, fixed at training time so that the RL reward is stationary: the baselines divide the score by it
    rcfg.update({"eval/pairwise_accuracy": ev["eval/pairwise_accuracy"], "eval/pairs": len(held),  # a warning if
                 "value_mean": ev["eval/value_mean"], "value_std": ev["eval/value_std"]})  # at chance (baselines)
    tu.write_json(os.path.join(cfg.out_dir, RM_CONFIG), rcfg)  # rank 0
    tu.finish(cfg.out_dir, summary)
    if "eval/rtg_corr" in summary:
        fu.print0("return-to-go rank correlation (value of a prefix vs its Monte Carlo return): " +
                  ", ".join(f"{k[len('eval/rtg_corr/'):] or 'all'} {v:.3f}" for k, v in summary.items()
                            if k.startswith("eval/rtg_corr")))
    fu.print0(f"saved to {cfg.out_dir}")
    fu.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main(tu.parse_config(Config))
    except (data.DataError, tu.ConfigError) as e:  # bad input or flag: one clear line, no traceback
        sys.exit(f"reward_model.py: {e}")
