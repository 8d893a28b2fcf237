"""Sharding: rules are strict, meshes are checked, and training on data / fsdp / tensor meshes of 8 fake
CPU devices gives the same losses as one device."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.sharding import device_grid, logical_to_spec, make_mesh

RULES = MeshConfig().rules
MESHES = {"data8": dict(data=8), "fsdp8": dict(data=1, fsdp=8),
          "tensor4_data2": dict(data=2, tensor=4), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


def sharding_config(workdir, corpus, tokenizer) -> Config:
    return Config(model=ModelConfig.preset("tiny", vocab_size=0, max_seq_len=32),
                  data=DataConfig(sources=(str(corpus),), seq_len=32),
                  optim=OptimConfig(lr=3e-3, warmup_steps=1),
                  train=TrainConfig(steps=3, batch_size=8, log_every=1, eval_every=0, eval_batches=1, save_every=0,
                                    async_checkpointing=False),
                  workdir=str(workdir), tokenizer=tokenizer).validate()


def test_rules_translate_and_refuse_two_axes_on_one_mesh_axis():
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), RULES) == P(None, "fsdp", "tensor", None)
    assert logical_to_spec(("batch", "length"), RULES) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="'batch' and 'embed' .* same mesh axis 'fsdp'"):
        logical_to_spec(("batch", "embed"), RULES)


def test_mesh_sizes_must_multiply_to_the_device_count():
    with pytest.raises(ValueError, match="= 4 but there are 1 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
    assert make_mesh(MeshConfig()).shape == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


class FakeDevice:
    """Stands for an accelerator in the layout functions, which read only these attributes."""
    def __init__(self, id, platform, slice_index=0):
        self.id, self.platform, self.slice_index = id, platform, slice_index
        self.device_kind, self.process_index = f"fake {platform}", 0

    def __repr__(self):
        return f"{self.platform}:{self.id}"


def test_mesh_follows_the_interconnect_through_mesh_utils():
    # GPUs: mesh_utils orders by the global (topology-aware) id, not the process order jax.devices() gives.
    gpus = [FakeDevice(i, "gpu") for i in (3, 1, 0, 2)]
    assert [d.id for d in device_grid([2, 1, 2], gpus).ravel()] == [0, 1, 2, 3]
    # CPU (fake devices): plain order, and make_mesh builds the same grid.
    cpus = jax.devices()
    assert list(make_mesh(MeshConfig()).devices.ravel()) == list(device_grid([len(cpus), 1, 1], cpus).ravel())


def test_multislice_mesh_puts_only_the_data_axis_across_slices():
    tpus = [FakeDevice(i, "tpu", slice_index=i // 4) for i in range(8)]
    with pytest.raises(ValueError, match="data=1 must be a multiple of the 2 TPU slices"):
        device_grid([1, 8, 1], tpus)


def test_losses_on_sharded_meshes_equal_one_device(tmp_path, english_corpus, tokenizer_path):
    from jaxllm.metrics import read_metrics
    from jaxllm.trainer import train
    train(sharding_config(tmp_path / "single", english_corpus, tokenizer_path))
    single = [r["train/loss"] for r in read_metrics(str(tmp_path / "single" / "metrics.jsonl")) if "train/loss" in r]
    worker = os.path.join(os.path.dirname(__file__), "multidevice_worker.py")
    out = subprocess.run([sys.executable, worker, str(english_corpus), tokenizer_path, str(tmp_path / "multi")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r["mesh"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    assert set(results) == set(MESHES)
    for name, r in results.items():
        np.testing.assert_allclose(r["losses"], single, rtol=2e-5, err_msg=name)
    # The meshes really shard (per-device shapes): fsdp splits the embed axis, tensor the mlp axis.
    # gate is (layers 2, embed 64, mlp 192); down is (layers 2, mlp 192, embed 64).
    assert results["data8"]["specs"]["gate"] == [2, 64, 192]
    assert results["fsdp8"]["specs"]["gate"] == [2, 8, 192]
    assert results["tensor4_data2"]["specs"]["gate"] == [2, 64, 48]
    assert results["data2_fsdp2_tensor2"]["specs"]["down"] == [2, 96, 32]
