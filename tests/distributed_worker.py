"""Run by tests/test_distributed.py in a fresh process with 8 fake CPU devices (XLA_FLAGS must be set before
jax is imported). One process, two runs:
  reference  the uninterrupted run on a data=8 mesh;
  moved      the two-process job's pre-emption checkpoint, restored here on a data=2 × fsdp=2 × tensor=2 mesh
             (one process instead of two: the data state is re-split) and trained to the end.
Prints one JSON line: both runs' losses, and how far the final parameters of the moved run and of the
two-process job are from the reference's."""
import json
import logging
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.weights import load_params  # noqa: E402
from jaxllm.cli import load_config  # noqa: E402
from jaxllm.metrics import read_metrics  # noqa: E402
from jaxllm.trainer import train  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
ref_dir, moved_dir, two_dir = sys.argv[1:4]
args = json.loads(sys.argv[4])            # the two-process job's flags, less its workdir
assert jax.device_count() == 8, jax.devices()


def losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r}


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                     jax.tree.leaves(b)))


ref = train(load_config(args + [f"--config.workdir={ref_dir}", "--config.mesh.data=8"]))
moved = train(load_config(args + [f"--config.workdir={moved_dir}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                                  "--config.mesh.tensor=2"]))
gate = moved["state"]["params"]["layers"]["mlp"]["gate"]
two_params, _, _ = load_params(two_dir)
print(json.dumps({
    "reference": losses(ref_dir), "moved": losses(moved_dir),
    "moved_gate_shard": list(gate.sharding.shard_shape(gate.shape)),
    "moved_vs_reference": max_diff(moved["state"]["params"], ref["state"]["params"]),
    "two_process_vs_reference": max_diff(two_params, ref["state"]["params"]),
}), flush=True)
