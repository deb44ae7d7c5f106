"""scripts/gpu_check.sh, dry-run on the CPU at toy sizes (GPU_CHECK_DRY=1): every step of the one-shot GPU
proof runs and passes, the killed-and-resumed run ends where the uninterrupted one does, and the summary
table is written. (On a GPU machine the same script runs at real sizes; docs/performance.md.)"""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = str(tmp_path / "gpu_check")
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_OUT=out, OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    summary = open(os.path.join(out, "summary.md")).read()
    for step in ("pipeline", "resume", "sdpa", "bench", "generation"):
        assert f"| {step} | pass |" in summary, summary
    assert json.load(open(os.path.join(out, "resume.json")))["max_abs_diff"] == 0.0  # CPU: bit-identical
    sdpa = json.load(open(os.path.join(out, "sdpa.json")))
    assert sdpa["policy_grad_nonfinite"] == 0 and all(c["repo_setting_nonfinite"] == 0 for c in sdpa["cases"])
    gen = json.load(open(os.path.join(out, "generation.json")))
    assert all(gen[k] > 0 for k in ("fsdp2_sync_per_token", "fsdp2_no_sync", "plain_sync_per_token", "plain_no_sync"))
