"""The command line as a user types it: real subprocesses, real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.cli import load_config
from jaxllm.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def jaxllm(*args, timeout=600, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxllm", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_overrides_apply_and_unknown_fields_are_named_with_suggestions(tmp_path):
    cfg = load_config(["--config=pretrain:model=tiny", f"--config.workdir={tmp_path}",
                       "--config.train.steps=7", "--config.model.num_layers=3"])
    assert cfg.train.steps == 7 and cfg.model.num_layers == 3
    out = jaxllm("train", f"--config={REPO / 'configs/pretrain.py'}:model=tiny", f"--config.workdir={tmp_path}",
                 "--config.train.stepz=7")
    assert out.returncode == 1
    assert "train.stepz" in out.stderr and "train.steps" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ConfigError, match="num_heads .* divisible"):
        load_config([f"--config={REPO / 'configs/pretrain.py'}", f"--config.workdir={tmp_path}",
                     "--config.model.num_kv_heads=3"])


def test_train_command_runs_resumes_and_writes_the_workdir(tmp_path, english_corpus):
    """Run from outside the checkout: `--config=pretrain` is the config installed with the package."""
    args = ["train", "--config=pretrain:model=tiny", f"--config.workdir={tmp_path}",
            f"--config.data.sources={english_corpus}", "--config.data.seq_len=64", "--config.train.batch_size=4",
            "--config.tokenizer_vocab_size=400", "--config.train.eval_every=0", "--config.train.log_every=2"]
    out = jaxllm(*args, "--config.train.steps=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[     4/4" in out.stderr and "eval/loss=" in out.stderr
    out = jaxllm(*args, "--config.train.steps=6", cwd=tmp_path)       # same workdir: resumes at step 4
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed" in out.stderr and "[     6/6" in out.stderr
    for name in ("config.json", "tokenizer.model", "metrics.jsonl", "plots/loss.png"):
        assert (tmp_path / name).exists(), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [2, 4, 6]


def test_tokenizer_train_command(tmp_path, english_corpus):
    out = jaxllm("tokenizer", "train", f"--input={english_corpus}", "--vocab_size=400", f"--out={tmp_path}",
                 "--user_defined_symbols=<|im_start|>,<|im_end|>")
    assert out.returncode == 0, out.stderr[-2000:]
    from jaxllm.tokenizer import Tokenizer
    tok = Tokenizer(str(tmp_path))
    assert tok.vocab_size == 400 and len(tok.encode("<|im_start|>")) <= 2
    assert tok.decode(tok.encode("The quick brown fox 12345")) == "The quick brown fox 12345"


def test_errors_are_one_line_without_a_traceback(tmp_path):
    out = jaxllm("tokenizer", "train", f"--input={tmp_path / 'missing.txt'}", f"--out={tmp_path}")
    assert out.returncode == 1 and "missing.txt" in out.stderr and "Traceback" not in out.stderr
    assert jaxllm("--help").returncode == 0 and "quickstart" in jaxllm("--help").stdout
    for command in (["tokenizer", "train"], ["convert", "from-hf"], ["quickstart"]):
        assert jaxllm(*command, "--help").returncode == 0


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, english_corpus):
    """Pre-emption: SIGTERM mid-run saves the current step; the next run resumes from it."""
    import signal
    import time
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxllm", "train", "--config=configs/pretrain.py:model=tiny",
         f"--config.workdir={tmp_path}", f"--config.data.sources={english_corpus}", "--config.data.seq_len=32",
         "--config.train.batch_size=2", "--config.tokenizer_vocab_size=400", "--config.train.steps=100000",
         "--config.train.log_every=1", "--config.train.save_every=0", "--config.train.eval_every=0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received" in err
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 3 <= saved < 100000


def test_convert_commands_round_trip_a_hugging_face_model(tmp_path, shared_data):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(
        (shared_data / "tokenizers" / "sentencepiece_test" / "test_model.model").read_bytes())
    out = jaxllm("convert", "from-hf", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'ckpt'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "ckpt" / "tokenizer.model").exists()                 # it carries its tokenizer
    out = jaxllm("convert", "to-hf", f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'back'}")
    assert out.returncode == 0, out.stderr[-2000:]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
