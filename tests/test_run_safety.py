"""Runs that never lose data silently: a changed config, a damaged checkpoint, Ctrl-C, duplicate or non-JSON
metric rows, leftover signal handlers, the start and end summaries, and the optional W&B sink. Each test runs
what a user runs (`jaxllm train` through the CLI, a subprocess, or `train()` from a script) on a tiny model."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxllm.cli import main as jaxllm_main
from jaxllm.distributed import StopSignal

REPO = Path(__file__).resolve().parents[1]


def strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl as a strict JSON reader sees it: NaN / Infinity are errors, not numbers."""
    def reject(name):
        raise ValueError(f"{path}: bare {name} is not JSON")
    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines() if line.strip()]


def train_losses(path: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in strict_rows(path):
        if "train/loss" in row:
            out.setdefault(row["step"], []).append(row["train/loss"])
    return out


def cli_args(workdir, corpus, tokenizer, steps: int, *extra) -> list[str]:
    return ["train", "--config=pretrain:model=tiny", f"--config.workdir={workdir}", f"--config.data.sources={corpus}",
            f"--config.tokenizer={tokenizer}", "--config.data.seq_len=32", "--config.train.batch_size=2",
            f"--config.train.steps={steps}", "--config.train.save_every=2", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.train.async_checkpointing=false",
            "--config.optim.lr=0.001", *extra]   # a fixed lr, so the changes below are changes whatever the default


def test_changed_config_damaged_checkpoints_and_duplicate_rows(tmp_path, english_corpus, tokenizer_path, capfd):
    """One workdir through a run's life: a refused config change (config.json untouched); the newest checkpoint
    with a truncated array file, the one before without its data-state file, the one before that without its
    manifest: the run resumes from the newest intact step, moves the damaged ones aside, keeps one metrics row
    per step, and records every accepted config change."""
    run = tmp_path / "run"
    other = tmp_path / "other.txt"
    other.write_text("\n".join(english_corpus.read_text().splitlines()[::-1]) + "\n")
    keep4 = "--config.train.keep_checkpoints=4"

    # 1) Eight steps: checkpoints 2, 4, 6, 8. The start and end summaries say what ran and where everything went.
    assert jaxllm_main(cli_args(run, english_corpus, tokenizer_path, 8, keep4)) == 0
    err = capfd.readouterr().err
    for text in ("parameters:", "trainable)", "devices: 1 x", "mesh data=1 fsdp=1 tensor=1",
                 "tokens per step: 64 (2 rows x 32)", f"data: {english_corpus}", f"workdir: {run}",
                 f"checkpoints: {run / 'checkpoints'} (steps 2, 4, 6, 8)", f"metrics: {run / 'metrics.jsonl'}",
                 f"plots: {run / 'plots' / 'loss.png'}"):
        assert text in err, text
    first = train_losses(run / "metrics.jsonl")
    saved_config = (run / "config.json").read_text()

    # 2) Other data and another learning rate in the same workdir: refused, naming each field, nothing written.
    code = jaxllm_main(cli_args(run, other, tokenizer_path, 10, keep4, "--config.optim.lr=0.01"))
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("jaxllm train: error:")]
    assert len(message) == 1, err[-3000:]
    assert f'data.sources: ["{english_corpus}"] -> ["{other}"]' in message[0]
    assert "optim.lr: 0.001 -> 0.01" in message[0] and "allow_config_change" in message[0]
    assert (run / "config.json").read_text() == saved_config and not (run / "config_history").exists()

    # 3) Damage, as a full disk, a cut-short copy or a hand-deleted file leaves it; then more steps (allowed).
    biggest = max((run / "checkpoints" / "8" / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    os.truncate(biggest, 1000)
    (run / "checkpoints" / "6" / "data_per_process" / "process_0-of-1.json").unlink()
    (run / "checkpoints" / "4" / "state" / "manifest.ocdbt").unlink()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "train/lo')                                       # a row cut short by kill -9
    assert jaxllm_main(cli_args(run, english_corpus, tokenizer_path, 10, keep4)) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err            # no TensorStore pages
    damaged = [line for line in err.splitlines() if "is damaged" in line]
    assert len(damaged) == 3, err[-3000:]
    assert "checkpoint 8 is damaged (ValueError: OUT_OF_RANGE" in damaged[0]
    assert "checkpoint 6 is damaged (data_per_process/ holds no data state" in damaged[1]
    assert "checkpoint 4 is damaged (state/manifest.ocdbt is missing)" in damaged[2]
    assert all(line.endswith("resuming from step 2") for line in damaged)
    # Rows 3-8 and step 8's eval were logged after checkpoint 2, and one row was cut short: all 8 go, counted.
    assert f"{run / 'metrics.jsonl'}: dropped 8 rows logged after step 2" in err
    aside = sorted((run / "checkpoints_damaged").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["4", "6", "8"]              # moved, not deleted
    assert all((p / "state").is_dir() for p in aside)
    second = train_losses(run / "metrics.jsonl")
    assert sorted(second) == list(range(1, 11)) and all(len(v) == 1 for v in second.values())   # no duplicates
    assert all(second[s] == first[s] for s in range(1, 9))                      # resumed exactly at step 2
    [record] = [json.loads(p.read_text()) for p in (run / "config_history").glob("*.json")]
    assert record["changes"] == {"train.steps": {"old": 8, "new": 10}}
    assert record["accepted_because"] == "allowed on resume" and record["previous"]["train"]["steps"] == 8

    # 4) A learning-rate change with the explicit override (no further steps): applied and recorded.
    assert jaxllm_main(cli_args(run, english_corpus, tokenizer_path, 10, keep4, "--config.optim.lr=0.002",
                                "--config.allow_config_change=true")) == 0
    latest = json.loads(sorted((run / "config_history").glob("*.json"))[-1].read_text())
    assert latest["changes"] == {"optim.lr": {"old": 0.001, "new": 0.002}}
    assert latest["accepted_because"] == "--config.allow_config_change=true"
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.002
    # NaN (MFU on a CPU) is written as null, and every row parses strictly.
    assert all(row["mfu"] is None for row in strict_rows(run / "metrics.jsonl") if "mfu" in row)

    # 5) Every checkpoint without its manifest: not damage of one step but of all. One line naming each step's
    #    reason, exit 1, nothing moved (the run must not silently start over).
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:
        (run / "checkpoints" / str(step) / "state" / "manifest.ocdbt").unlink()
    code = jaxllm_main(cli_args(run, english_corpus, tokenizer_path, 12, keep4, "--config.optim.lr=0.002"))
    err = capfd.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("jaxllm train: error:")]
    assert code == 1 and len(message) == 1 and "Traceback" not in err, err[-3000:]
    assert f"no checkpoint in {run / 'checkpoints'} reads back: step {steps[-1]}: state/manifest.ocdbt" in message[0]
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == steps


def test_ctrl_c_saves_a_checkpoint_and_exits_non_zero_in_one_line(tmp_path, english_corpus, tokenizer_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = cli_args(tmp_path, english_corpus, tokenizer_path, 100000, "--config.train.save_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved >= 3
    assert err.strip().splitlines()[-1] == (f"jaxllm train: stopped by Ctrl-C at step {saved} of 100000; checkpoint "
                                            f"saved in {tmp_path / 'checkpoints' / str(saved)}: run the same command "
                                            f"again to resume")


def test_second_ctrl_c_stops_at_once_and_handlers_come_back():
    """The library's stop signal: the first Ctrl-C asks for a save, the second raises at once; leaving it, with
    or without an exception, puts back the handlers that were there before."""
    def mine(signum, frame):
        pass
    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            with StopSignal() as stop:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                assert stop.interrupted and stop.reached(1)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(RuntimeError):
            with StopSignal():
                raise RuntimeError("a failing step")
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


FAKE_WANDB = '''
"""A stand-in for the wandb package: records every call in WANDB_CALLS (a JSON Lines file)."""
import json, os

def _record(name, **kw):
    with open(os.environ["WANDB_CALLS"], "a") as f:
        f.write(json.dumps({"call": name, **kw}, default=str) + "\\n")

class Run:
    def log(self, values, step=None):
        _record("log", values=values, step=step)

    def finish(self, exit_code=None):
        _record("finish")

def init(**kwargs):
    _record("init", kwargs={k: v for k, v in kwargs.items() if k != "config"}, has_config="config" in kwargs,
            mode=os.environ.get("WANDB_MODE"))
    return Run()
'''


def test_wandb_gets_every_logged_row_and_handlers_are_restored(tmp_path, english_corpus, tokenizer_path,
                                                               monkeypatch):
    """train() from a script, with log.wandb set and a wandb module on the path: W&B receives what
    metrics.jsonl holds (finite values), offline mode is left to WANDB_MODE; and the script's signal handlers
    are its own again when train() returns."""
    from jaxllm.cli import load_config
    from jaxllm.trainer import train

    (tmp_path / "fake" / "wandb.py").parent.mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    sys.modules.pop("wandb", None)
    monkeypatch.setenv("WANDB_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("WANDB_MODE", "offline")

    def mine(signum, frame):
        pass
    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cfg = load_config(cli_args(tmp_path / "run", english_corpus, tokenizer_path, 2, "--config.log.wandb=proj")[1:])
        train(cfg)
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        sys.modules.pop("wandb", None)   # the stand-in must not outlive this test
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls[0]["call"] == "init" and calls[-1]["call"] == "finish"
    init = calls[0]
    assert init["kwargs"]["project"] == "proj" and init["kwargs"]["name"] == "run" and init["has_config"]
    assert init["mode"] == "offline" and "mode" not in init["kwargs"]
    assert init["kwargs"]["id"] == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    logged = [(c["step"], c["values"]) for c in calls if c["call"] == "log"]
    rows = strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert [s for s, _ in logged] == [r["step"] for r in rows]
    for (_, values), row in zip(logged, rows):
        assert values == {k: v for k, v in row.items() if k != "step" and v is not None}


def test_wandb_asked_for_but_not_installed_is_one_line(tmp_path, english_corpus, tokenizer_path, capfd):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the missing-package message cannot show")
    code = jaxllm_main(cli_args(tmp_path, english_corpus, tokenizer_path, 2, "--config.log.wandb=proj"))
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "jaxllm train: error: log.wandb is set but the wandb package is not installed: pip install " \
           "'jaxllm[wandb]'" in err
    assert not (tmp_path / "config.json").exists()   # refused before the run wrote anything


def test_a_run_saved_with_the_template_auto_resolves_to_is_no_change_on_resume():
    """Runs saved before data.template defaulted to "auto" said "alpaca"; resuming them under "auto" (which
    resolves to alpaca without an init_from template) must not be refused as a config change."""
    from jaxllm.config import Config, DataConfig
    from jaxllm.run_setup import _same_template
    cfg = Config(data=DataConfig(template="auto"))
    assert _same_template(cfg, {"data": {"template": "alpaca"}})
    assert not _same_template(cfg, {"data": {"template": "chatml"}})
