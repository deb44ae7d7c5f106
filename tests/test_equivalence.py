"""1 vs 2 processes (FSDP2, gloo) on the same global batch: a DVPO, PPO and GRPO step, and a GVM, reward-model
and DPO step (tests/dist_rl_step.py) give the same advantages, returns, losses, gradients and weights.
Every loss is a global mean (docs/algorithm.md §5): a loss divided by this rank's own token (chain-entry, pair)
count instead of the global one, a missing `* world` before backward, or batch statistics that are not
all-reduced change the 2-process numbers, and fail here."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from bench import free_port
from tests import dist_rl_step

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_rl_step.py")


def torchrun(out, nproc: int, timeout: int = 300):
    """The script under torchrun, in its own process group, killed as a whole on timeout so that no rank is
    left behind."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), SCRIPT, str(out)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        pytest.fail(f"timed out after {timeout}s:\n{log[-6000:]}")
    assert p.returncode == 0, log[-4000:]


def results(out):
    return json.load(open(os.path.join(out, "result.json"))), load_file(os.path.join(out, "grads.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same lines in this process (no process group: plain modules) and on 2 gloo processes (FSDP2)."""
    d = tmp_path_factory.mktemp("equivalence")
    dist_rl_step.main(str(d / "one"))
    torchrun(d / "two", nproc=2)
    return results(d / "one"), results(d / "two")


def test_advantages_and_returns_are_those_of_the_global_batch(runs):
    """Whitening (§3) uses all-reduced statistics: each row's advantages (and PPO's returns) are the same
    whether its batch is split over 2 processes or not."""
    (r1, _), (r2, _) = runs
    assert (r1["world"], r2["world"]) == (1, 2)
    for key in ("dvpo_adv", "ppo_adv", "ppo_returns", "grpo_adv"):
        assert set(r1[key]) == set(r2[key]) == {str(b) for b in range(8)}, key
        for b in r1[key]:
            torch.testing.assert_close(torch.tensor(r2[key][b]), torch.tensor(r1[key][b]), atol=1e-5, rtol=1e-5,
                                       msg=f"{key}, row {b}")


def test_losses_are_global_means(runs):
    """Logged losses: every minibatch's policy (and value) loss, and the GVM's and the RM's step loss."""
    (r1, _), (r2, _) = runs
    for key in ("dvpo_loss", "ppo_policy_loss", "ppo_value_loss", "grpo_loss"):
        assert len(r1[key]) == len(r2[key]) == 2 and r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-7), key
    for key in ("gvm_loss", "rm_loss", "dpo_loss"):
        assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
    assert r2["dpo_margin"] == pytest.approx(r1["dpo_margin"], rel=1e-5, abs=1e-7)


def test_gradients_and_weights_are_the_same(runs):
    """Every optimizer step's full gradient (after clipping) of the policy (DVPO, PPO, GRPO, DPO), the critic, the
    GVM and the RM, and the policies' weights after two SGD steps."""
    (_, g1), (_, g2) = runs
    assert set(g1) == set(g2)
    groups = {k.split(".")[0] + "." + k.split(".")[1] for k in g1}
    assert {"dvpo.0", "dvpo.1", "ppo.0", "ppo.1", "critic.0", "critic.1", "grpo.0", "grpo.1", "gvm.0", "rm.0",
                      "dpo.0", "dvpo.final"} <= groups
    for group in sorted(groups):
        keys = [k for k in g1 if k.startswith(group + ".")]
        a = torch.cat([g1[k].flatten() for k in keys])
        b = torch.cat([g2[k].flatten() for k in keys])
        scale = a.abs().max()
        assert scale > 0 and (b - a).abs().max() <= 1e-5 * scale, (group, (b - a).abs().max().item(), scale.item())
    init = {k: v for k, v in g1.items() if k.startswith("dvpo.final.")}
    moved = max((g1[k] - g1[k.replace("dvpo.final", "ppo.final")]).abs().max().item() for k in init)
    assert moved > 0  # the two methods' policies took different steps: the updates were not empty
