"""Run by tests/test_sharding.py in a fresh process with 8 fake CPU devices (XLA_FLAGS must be set before
jax is imported, so this cannot run inside the pytest process). Prints one JSON line per mesh."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402

import jax  # noqa: E402

from jaxllm.config import MeshConfig  # noqa: E402
from jaxllm.trainer import train  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_sharding import MESHES, sharding_config  # noqa: E402

corpus, tokenizer, workdir = sys.argv[1:4]
assert jax.device_count() == 8, jax.devices()
for name, sizes in MESHES.items():
    cfg = sharding_config(os.path.join(workdir, name), corpus, tokenizer)
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(**sizes))
    result = train(cfg)
    params = result["state"]["params"]
    # Per-device shard shapes show what each mesh actually split.
    specs = {k: list(params["layers"]["mlp"][k].sharding.shard_shape(params["layers"]["mlp"][k].shape))
             for k in ("gate", "down")}
    losses = [json.loads(line)["train/loss"] for line in open(os.path.join(workdir, name, "metrics.jsonl"))
              if "train/loss" in line]
    print(json.dumps({"mesh": name, "losses": losses, "specs": specs}), flush=True)
