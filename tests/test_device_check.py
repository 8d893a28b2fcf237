"""benchmarks/device_check.py --smoke: the device check's code paths (interpreted Pallas kernels against xla, the
train step beside the transformers peer, decode beside HF generate) run on CPU, so the script works the day a
GPU or TPU is lent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_device_check_smoke_runs_every_section_and_the_kernels_agree_with_xla(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", f"--json={out}"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    kernels = {r["kernel"]: r for r in result["kernels"]}
    assert set(kernels) == {"xla", "pallas", "splash"}
    for name in ("pallas", "splash"):   # the real kernel code, interpreted, in float32
        assert max(kernels[name][g] for g in ("out", "dq", "dk", "dv")) < 1e-5, kernels[name]
    trainers = {r["trainer"]: r for r in result["train_step"]}
    assert trainers["jaxllm"]["tokens_per_s"] > 0 and trainers["hf-torch eager"]["tokens_per_s"] > 0
    decoders = {r["decoder"]: r for r in result["decode"]}
    assert decoders["hf generate"]["same_tokens"] is True   # same weights, greedy: same continuation
    assert "kernels failing their bound: none" in proc.stdout
