"""One DVPO, PPO and GRPO step, and one GVM, reward-model and DPO step on a fixed global batch: the lines the
scripts run (dvpo.score / update, ppo_baseline.score / update, grpo_baseline.score / update, gvm.train_step,
reward_model.train_step, dpo_baseline.train_step), in
one process and under FSDP2 (test_equivalence.py compares the two). Each rank takes its strided share of
the global batch (rows rank, rank + world, ...), as the scripts do.

  python tests/dist_rl_step.py OUT
  torchrun --nproc_per_node 2 tests/dist_rl_step.py OUT

Writes OUT/result.json (losses reduced over ranks, advantages and returns by global row) and
OUT/grads.safetensors (every optimizer step's full gradients, after clipping, and the final weights), rank 0.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import dpo_baseline  # noqa: E402
import dvpo  # noqa: E402
import fsdp_utils as fu  # noqa: E402
import grpo_baseline  # noqa: E402
import gvm  # noqa: E402
import model as mdl  # noqa: E402
import ppo_baseline  # noqa: E402
import reward_model  # noqa: E402
import task  # noqa: E402

torch.set_num_threads(1)
TOK = task.build_char_tokenizer()
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
PROMPTS = ["52817:", "903:", "4412:", "7:", "61:", "283:", "90210:", "55:"]
RESPONSES = ["12578", "039", "1244x12", "7", "16", "2838", "01229", "5"]  # all but the third end with EOS


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def lm(seed: int, device, frozen: bool = False):
    m = task.build_tiny_model(TOK, seed=seed, **SIZE)
    if frozen:
        m.requires_grad_(False).eval()
    return fu.shard(m, device)


def value_model(seed: int, device, frozen: bool = False):
    vm = mdl.ValueModel(task.build_tiny_model(TOK, seed=seed, **SIZE).model)
    with torch.no_grad():
        vm.value_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
        vm.value_head.bias.fill_(0.3)
    if frozen:
        vm.requires_grad_(False).eval()
    return fu.shard(vm, device, fp32_modules=mdl.FP32_MODULES)


def recording_sgd(module, name: str, grads: dict, lr: float):
    """SGD (lr set by the step from cfg.lr) whose step pre-hook stores the full gradients (a collective
    under FSDP2: every rank runs the hook) as grads[f"{name}.{k}.{param}"] for optimizer step k."""
    named = list(module.named_parameters())
    opt = torch.optim.SGD([p for _, p in named], lr=lr)
    count = [0]

    def hook(o, args, kwargs):
        for n, p in named:
            grads[f"{name}.{count[0]}.{n}"] = full(p.grad)
        count[0] += 1
    opt.register_step_pre_hook(hook)
    return opt


def local_rollout(rows: list[int]) -> dict:
    """The rollout layout (left-padded prompts, right-padded responses) of this rank's rows."""
    prompts = [ids(PROMPTS[b]) for b in rows]
    responses = [ids(RESPONSES[b]) + ([] if b == 2 else [EOS]) for b in rows]
    P, T = max(map(len, prompts)), max(map(len, responses))
    return {"input_ids": torch.tensor([[PAD] * (P - len(p)) + p + r + [PAD] * (T - len(r))
                                       for p, r in zip(prompts, responses)]),
            "attention_mask": torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (T - len(r))
                                            for p, r in zip(prompts, responses)]),
            "prompt_len": torch.full((len(rows),), P), "response_len": torch.tensor([len(r) for r in responses]),
            "response": torch.tensor([r + [PAD] * (T - len(r)) for r in responses]), "prompt_ids": prompts}


def by_row(rows: list[int], t: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Every rank's {global row: valid entries} merged (all-gather)."""
    mine = {b: t[i, :int(lengths[i])].tolist() for i, b in enumerate(rows)}
    return {b: v for part in fu.all_gather_object(mine) for b, v in part.items()}


def main(out: str):
    device = fu.setup("cpu")
    rows = list(range(8))[fu.rank()::fu.world()]
    batch = local_rollout(rows)
    grads, result = {}, {"world": fu.world()}
    ref, frozen_gvm, rm = lm(1, device, frozen=True), value_model(2, device, frozen=True), value_model(3, device,
                                                                                                    frozen=True)
    # clipping off (grad_clip 1e9): a clipped gradient would hide a wrong scale, e.g. a missing `* world`
    kw = dict(batch_size=8, minibatch_size=8, micro_batch_size=2, ppo_epochs=2, lr=1.0, warmup_steps=1,
              gamma=0.9, lam=0.8, temperature=0.7, grad_clip=1e9)

    # DVPO: one rollout batch, 2 epochs of one minibatch (the global batch) in micro-batches of 2 rows
    policy = lm(0, device)
    policy.train()
    cfg = dvpo.Config(**kw)
    tau = [ids(PROMPTS[(b + 3) % 8]) + ids(RESPONSES[(b + 3) % 8]) for b in rows]
    sc = dvpo.score(policy, ref, frozen_gvm, batch, tau, 0.3, 2.5, cfg, PAD, device)
    stats, _ = dvpo.update(policy, recording_sgd(policy, "dvpo", grads, cfg.lr), batch, sc, cfg, 0, 0)
    result["dvpo_adv"] = by_row(rows, sc["adv"], batch["response_len"])
    result["dvpo_loss"] = [fu.reduce_metrics({"l": x}, device)["l"] for x in stats["policy_loss"]]
    grads.update({f"dvpo.final.{k}": v for k, v in fu.full_state_dict(policy).items()})

    # PPO: the same, with the critic
    policy, critic = lm(0, device), value_model(4, device)
    policy.train()
    critic.train()
    cfg = ppo_baseline.Config(**kw, critic_lr=1.0)
    sc = ppo_baseline.score(policy, ref, rm, critic, batch, 0.3, 2.5, cfg, device)
    stats, _ = ppo_baseline.update(policy, critic, recording_sgd(policy, "ppo", grads, cfg.lr),
                                   recording_sgd(critic, "critic", grads, cfg.critic_lr), batch, sc, cfg, 0, 0)
    for k in ("adv", "returns"):
        result[f"ppo_{k}"] = by_row(rows, sc[k], batch["response_len"])
    for k in ("policy_loss", "value_loss"):
        result[f"ppo_{k}"] = [fu.reduce_metrics({"l": x}, device)["l"] for x in stats[k]]
    grads.update({f"ppo.final.{k}": v for k, v in fu.full_state_dict(policy).items()})

    # GRPO: groups of n consecutive rows, whole groups per rank (rank r takes groups r, r + world, ...), as
    # grpo_baseline.py samples them: each rank rolls out all n responses of its own prompts
    n = 2
    g_rows = [b for g in list(range(8 // n))[fu.rank()::fu.world()] for b in range(g * n, g * n + n)]
    g_batch = local_rollout(g_rows)
    policy = lm(0, device)
    policy.train()
    cfg = grpo_baseline.Config(**{k: v for k, v in kw.items() if k != "lam"}, group_size=n, estimator="grpo")
    sc = grpo_baseline.score(policy, ref, rm, g_batch, None, 0.3, 2.5, cfg, device)
    stats, _ = grpo_baseline.update(policy, recording_sgd(policy, "grpo", grads, cfg.lr), g_batch, sc, cfg, 0, 0)
    result["grpo_adv"] = by_row(g_rows, sc["adv"], g_batch["response_len"])
    result["grpo_loss"] = [fu.reduce_metrics({"l": x}, device)["l"] for x in stats["policy_loss"]]

    # GVM and reward model: one optimizer step on 8 pairs (this rank's share), micro-batches of 2 pairs
    examples = [{"prompt": ids(PROMPTS[i]), "chosen": ids(RESPONSES[(i + 1) % 8]) + [EOS],
                 "rejected": ids(RESPONSES[(i + 5) % 8])[:3] + [EOS], "policy": "A"} for i in range(8)]
    for name in ("gvm", "rm"):
        vm = value_model(5, device)
        vm.train()
        if name == "gvm":
            cfg = gvm.Config(batch_size=8, micro_batch_size=2, lr=0.0, gamma=0.9, lam=0.8, grad_clip=1e9)
            loss, _ = gvm.train_step(vm, recording_sgd(vm, name, grads, 0.0), examples, rows, "preference",
                                     gvm.tau_pools(examples, "preference"), cfg, 0, 1, PAD,
                                     lambda e, k: 1.0 if k == "chosen" else -1.0, device)
        else:
            cfg = reward_model.Config(batch_size=8, micro_batch_size=2, lr=0.0, grad_clip=1e9)
            loss, _ = reward_model.train_step(vm, recording_sgd(vm, name, grads, 0.0), examples, rows, cfg, 0, 1, PAD,
                                              device)
        result[f"{name}_loss"] = fu.reduce_metrics({"l": loss * fu.world()}, device)["l"]  # the sum of the shares

    # DPO: one optimizer step on the same 8 pairs, the policy against the reference
    policy = lm(0, device)
    policy.train()
    cfg = dpo_baseline.Config(batch_size=8, micro_batch_size=2, lr=0.0, beta=0.5, grad_clip=1e9)
    loss, _, margin = dpo_baseline.train_step(policy, ref, recording_sgd(policy, "dpo", grads, 0.0), examples, rows,
                                              cfg, 0, 1, PAD, device)
    result["dpo_loss"] = fu.reduce_metrics({"l": loss * fu.world()}, device)["l"]
    result["dpo_margin"] = {b: v for part in fu.all_gather_object(dict(zip(rows, margin.tolist()))) for b, v in
                            part.items()}

    if fu.rank() == 0:
        os.makedirs(out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in grads.items()}, os.path.join(out, "grads.safetensors"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f, indent=2)
    fu.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
