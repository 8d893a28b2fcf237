"""Workdirs and prepared data in an object store: a real S3 server (moto's) on 127.0.0.1, reached as a user reaches
MinIO, through AWS_ENDPOINT_URL (conftest.s3_endpoint). Checkpoints go through Orbax and TensorStore's s3 driver,
everything else through etils.epath and s3fs; nothing is stubbed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etils import epath

from jaxllm.cli import main as jaxllm_main

pytest.importorskip("s3fs")
REPO = Path(__file__).resolve().parents[1]


def train_args(workdir, source, tokenizer, steps: int, *extra) -> list[str]:
    return ["train", "--config=pretrain:model=tiny", f"--config.workdir={workdir}", f"--config.data.sources={source}",
            f"--config.tokenizer={tokenizer}", "--config.data.seq_len=32", "--config.train.batch_size=2",
            f"--config.train.steps={steps}", "--config.train.save_every=2", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.async_checkpointing=false", *extra]


def strict_rows(text: str) -> list[dict]:
    """metrics.jsonl as a strict JSON reader sees it (bare NaN is an error)."""
    def reject(name):
        raise ValueError(f"bare {name} is not JSON")
    return [json.loads(line, parse_constant=reject) for line in text.splitlines() if line.strip()]


def losses(text: str) -> dict[int, float]:
    rows = [r for r in strict_rows(text) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in rows}


def committed_steps(checkpoints: epath.Path) -> list[int]:
    if not checkpoints.exists():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def test_run_in_a_bucket_on_prepared_data_there_stopped_and_resumed_exactly(s3_bucket, english_corpus,
                                                                            tokenizer_path, tmp_path, monkeypatch):
    """The pod workflow on a loopback S3 server. `jaxllm data prepare --out=s3://...` uploads its ArrayRecord shards
    and prepared.json; `jaxllm train` with its workdir in the bucket and that URL as its source is stopped by
    SIGTERM (a pre-empted host) after its first checkpoint, then resumed. Every output is in the bucket,
    metrics.jsonl has one strict-JSON row per step, and the losses are those of the same run never stopped, on a
    local workdir and the data prepared locally. `eval ppl` then reads the checkpoint from the bucket and writes its
    report there; the weights it reads are the local run's."""
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))     # prepare's staging, the shards' local copy
    data = f"{s3_bucket}/prepared/pydoc"
    for out in (data, tmp_path / "prepared"):
        assert jaxllm_main(["data", "prepare", f"--input={english_corpus}", f"--tokenizer={tokenizer_path}",
                            f"--out={out}", "--workers=1"]) == 0
    manifest = json.loads((epath.Path(data) / "prepared.json").read_text())
    assert manifest["documents"] > 1000
    for shard in manifest["shards"]:
        assert (epath.Path(data) / shard["file"]).read_bytes() == (tmp_path / "prepared" / shard["file"]).read_bytes()

    steps = 10
    run = f"{s3_bucket}/runs/tiny"
    args = train_args(run, data, tokenizer_path, steps)
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm", *args], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = epath.Path(run)
    deadline = time.time() + 120
    while time.time() < deadline and not committed_steps(root / "checkpoints") and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received" in err and committed_steps(root / "checkpoints")[-1] < steps, err[-2000:]

    assert jaxllm_main(args) == 0                                        # resumes from the bucket
    local = tmp_path / "local"
    assert jaxllm_main(train_args(local, tmp_path / "prepared", tokenizer_path, steps)) == 0

    resumed = losses((root / "metrics.jsonl").read_text())
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed == losses((local / "metrics.jsonl").read_text())
    assert committed_steps(root / "checkpoints")[-1] == steps
    assert (root / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    config = json.loads((root / "config.json").read_text())
    assert config["workdir"] == run and config["data"]["sources"] == [data]
    assert (root / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = [p.name for p in (root / "tensorboard").iterdir()]
    assert len(events) == 2 and all(n.startswith("events.out.tfevents") for n in events)   # one per process run

    from jaxllm.weights import load_params
    import numpy as np
    import jax
    remote_params, _, _ = load_params(run)
    local_params, _, _ = load_params(str(local))
    jax.tree.map(np.testing.assert_array_equal, remote_params, local_params)
    assert jaxllm_main(["eval", "ppl", f"--checkpoint={run}", f"--text={english_corpus}", "--max_chars=2000",
                        "--window=32"]) == 0
    overall = json.loads((root / "eval" / "ppl.json").read_text())["overall"]
    assert overall["tokens"] > 100 and overall["perplexity"] == pytest.approx(2 ** overall["bits_per_token"])


def test_metrics_in_a_bucket_are_buffered_whole_objects_and_resume_drops_later_rows(s3_bucket):
    """An object cannot be appended to: the writer keeps rows until flush() and writes metrics.jsonl whole. A run
    resumed at step 3 drops rows 4 and 5 of the run that crashed, then logs them again: one row per step."""
    from jaxllm.metrics import MetricWriter, drop_rows_after
    workdir = f"{s3_bucket}/run"
    writer = MetricWriter(workdir, flush_seconds=3600)
    for step in range(1, 6):
        writer.write(step, {"train/loss": 10.0 - step})
    path = epath.Path(workdir) / "metrics.jsonl"
    assert not path.exists()                          # buffered: nothing written between flushes
    writer.flush()
    assert [r["step"] for r in strict_rows(path.read_text())] == [1, 2, 3, 4, 5]
    path.write_text(path.read_text() + '{"step": 6, "train/lo')   # a row cut short by a crash
    writer.close()

    assert drop_rows_after(path, 3) == 3
    writer = MetricWriter(workdir, flush_seconds=3600)
    for step in (4, 5):
        writer.write(step, {"train/loss": float("nan")})
    writer.close()
    rows = strict_rows(path.read_text())
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["train/loss"] is None
    assert len(list((epath.Path(workdir) / "tensorboard").iterdir())) == 2


def test_tokenizer_trained_into_a_bucket_is_the_one_trained_locally(s3_bucket, english_corpus, tmp_path):
    """A run given no tokenizer trains one into its workdir: sentencepiece writes local files, so it trains in a
    temporary folder and uploads; the model has the pieces of the one trained locally with the same seed (the
    files differ only in the training folder sentencepiece records)."""
    from jaxllm.tokenizer import load_tokenizer, train_tokenizer
    remote = train_tokenizer(input_files=[english_corpus], out_dir=f"{s3_bucket}/run", vocab_size=400)
    local = train_tokenizer(input_files=[english_corpus], out_dir=tmp_path, vocab_size=400)
    assert remote.path == f"{s3_bucket}/run/tokenizer.model"
    again = load_tokenizer(f"{s3_bucket}/run")                    # read back from the bucket
    assert [again.id_to_piece(i) for i in range(400)] == [local.id_to_piece(i) for i in range(400)]
    assert (epath.Path(s3_bucket) / "run" / "tokenizer.vocab").read_text() == (tmp_path / "tokenizer.vocab").read_text()


def test_a_step_cut_short_in_the_bucket_is_not_resumed_from_and_is_written_again(s3_bucket):
    """Objects cannot be renamed, so a step is written in place and finished by commit_success.txt: a host killed
    mid-save leaves a step without it, which neither jaxllm nor Orbax counts, and the resumed run saves it again."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxllm.checkpoint import RunCheckpointer, checkpoint_steps
    workdir = f"{s3_bucket}/run"
    checkpoints = epath.Path(workdir) / "checkpoints"
    state = {"w": jnp.arange(8.0)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpt = RunCheckpointer(workdir, async_save=False)
    ckpt.save(2, state, {"position": 2})
    ckpt.close()
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA"):     # what a save killed early leaves behind
        (checkpoints / "4" / name).write_text("{}")

    ckpt = RunCheckpointer(workdir, async_save=False)
    assert checkpoint_steps(checkpoints) == ckpt.manager.all_steps() == [2]
    step, restored, data = ckpt.restore_newest(abstract)
    assert step == 2 and data == {"position": 2}
    np.testing.assert_array_equal(restored["w"], np.arange(8.0))
    ckpt.save(4, {"w": state["w"] * 4}, {"position": 4})
    assert checkpoint_steps(checkpoints) == [2, 4]
    np.testing.assert_array_equal(ckpt.restore(4, abstract)[0]["w"], np.arange(8.0) * 4)
    ckpt.close()
