"""Hub ids as model paths: resolved through huggingface_hub's cache, offline, with no network. The cache is laid
out in a temporary HF_HUB_CACHE exactly as huggingface_hub writes it (models--org--name/snapshots/<rev>/,
refs/main), holding a tiny exported model."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from jaxllm.config import ModelConfig
from jaxllm.model.convert import to_hf
from jaxllm.model.spec import init_params
from jaxllm.tokenizer import Tokenizer

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tokenizer_path):
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-qwen"
    cfg = ModelConfig.preset("tiny", vocab_size=Tokenizer(tokenizer_path).vocab_size, qkv_bias=True)
    to_hf(init_params(cfg, jax.random.key(0)), cfg, repo / "snapshots" / REVISION, tokenizer_path=tokenizer_path)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def _jaxllm(args, cache, cwd):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxllm", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_a_cached_hub_id_converts_and_loads_offline(hub_cache, tmp_path):
    out = _jaxllm(["convert", "from-hf", "--hf_dir=tiny-org/tiny-qwen", f"--out={tmp_path / 'ckpt'}"], hub_cache,
                  tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ckpt" / "params").exists() and (tmp_path / "ckpt" / "tokenizer.model").exists()
    code = ("from jaxllm.inference import load_for_inference; m = load_for_inference('tiny-org/tiny-qwen'); "
            "print(m.cfg.qkv_bias, m.tokenizer.vocab_size)")
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    loaded = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split()[0] == "True"


def test_an_uncached_hub_id_offline_is_one_clear_line(hub_cache, tmp_path):
    out = _jaxllm(["convert", "from-hf", "--hf_dir=Qwen/Qwen2.5-0.5B", f"--out={tmp_path / 'x'}"], hub_cache, tmp_path)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "'Qwen/Qwen2.5-0.5B' is not a local path and not in the Hugging Face cache" in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
