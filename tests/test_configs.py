"""Every shipped config parses through the command line's loader, holds exactly the dataclasses' fields, and
states every value that differs from their defaults; the configs are found by name from any directory."""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.cli import load_config_dict, shipped_configs
from jaxllm.config import Config, ConfigError, from_config_dict
from jaxllm.configs.presets import PRESETS
from jaxllm.run_history import flatten as leaves   # {"a.b": value} of a nested dict

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if "\ndef get_config(" in p.read_text())


def documented_args(path: Path) -> list[str]:
    """The `:arg` of every `--config=<this config>:arg` in the docstring, plus each model preset."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    args = set(re.findall(rf"--config={path.stem}:(\S+?)[`\s]", doc + " "))
    return ["", *sorted(args), *(f"model={name}" for name in PRESETS)]


def stated_fields(path: Path) -> set[str]:
    """Dotted fields a config file assigns (`c.a.b = ...`), including those of the shipped configs it builds on."""
    tree = ast.parse(path.read_text())
    stated = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxllm.configs"):
            bases = [a.name for a in node.names] if node.module == "jaxllm.configs" else [node.module.split(".")[-1]]
            stated = stated.union(*(stated_fields(path.parent / f"{base}.py") for base in bases))
        for target in getattr(node, "targets", [getattr(node, "target", None)]):
            parts = []
            while isinstance(target, ast.Attribute):
                parts.append(target.attr)
                target = target.value
            if isinstance(target, ast.Name) and parts:
                stated.add(".".join(reversed(parts)))
    return stated


def test_the_checkout_configs_are_the_installed_ones():
    assert {p.stem: p.resolve() for p in CONFIG_FILES} == {k: v.resolve() for k, v in shipped_configs().items()}
    assert {"pretrain", "continue_pretrain", "sft", "reward", "dpo"} <= set(shipped_configs())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_config_has_every_dataclass_field_and_states_what_differs(path, tmp_path):
    assert f"jaxllm train --config={path.stem}" in ast.get_docstring(ast.parse(path.read_text()))  # how to run it
    defaults = leaves(dataclasses.asdict(Config()))
    stated = stated_fields(path)
    for arg in documented_args(path):
        spec = f"{path.stem}:{arg}" if arg else path.stem
        config = load_config_dict([f"--config={spec}"])
        values = leaves(config.to_dict())
        assert sorted(values) == sorted(defaults), f"{spec}: fields differ from the dataclasses'"
        model = re.search(r"model=([^,]+)", arg)
        preset = {f"model.{k}" for k in PRESETS[model.group(1) if model else "tiny"]}
        unstated = {k: v for k, v in values.items() if v != defaults[k] and k not in stated | preset}
        assert not unstated, f"{spec}: fields differ from the dataclass default without being stated: {unstated}"
        config.workdir = str(tmp_path)
        if config.objective != "lm":    # post-training refuses to start without a model (or "scratch", said)
            with pytest.raises(ConfigError, match="init_from=scratch"):
                from_config_dict(config)
            config.init_from = "scratch"
        from_config_dict(config)                                    # and it validates


def test_names_resolve_from_any_directory_and_paths_still_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    specs = {"pretrain": "lm", "pretrain.py": "lm", "sft:model=tiny": "sft", "sft.py:model=125m,template=chat": "sft"}
    for spec, objective in specs.items():
        config = load_config_dict([f"--config={spec}", "--config.train.steps=7"])
        assert config.train.steps == 7 and config.objective == objective
    mine = tmp_path / "mine.py"
    mine.write_text("from jaxllm.configs import pretrain\n\ndef get_config(arg=''):\n"
                    "    c = pretrain.get_config(arg)\n    c.train.steps = 3\n    return c\n")
    assert load_config_dict([f"--config={mine}:model=125m"]).train.steps == 3          # an absolute path
    assert load_config_dict(["--config=mine.py"]).train.steps == 3                       # a relative one wins
    with pytest.raises(ConfigError, match="no shipped config named 'nope'.*pretrain"):
        load_config_dict(["--config=nope"])
    with pytest.raises(ConfigError, match="did you mean --config=pretrain"):
        load_config_dict(["--config=configs/pretrain.py"])                               # not in this directory
    with pytest.raises(ConfigError, match="'modle=tiny'.*model"):
        load_config_dict(["--config=pretrain:modle=tiny"])                               # a typo is not ignored


def test_cli_outside_the_checkout_names_the_shipped_configs(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "jaxllm", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=tmp_path, env=env, timeout=300)
    out = run("train", "--config=pretrain:model=tiny", f"--config.workdir={tmp_path}", "--config.train.stepz=1")
    assert out.returncode == 1 and "train.steps" in out.stderr and "Traceback" not in out.stderr   # it was loaded
    out = run("train", "--config=pretrian", f"--config.workdir={tmp_path}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "pretrian" in out.stderr and "pretrain, reward, sft" in out.stderr


def test_tiny_pretraining_is_scored_and_sampled_within_the_length_it_trains_at():
    """`eval ppl`'s windows and generation stop at model.max_seq_len. For the from-scratch tiny config that is the
    row length it trains at: the preset's 512 made `eval ppl` score positions 256-511, which no step had reached
    (a held-out novel scored 0.3% worse, the quickstart's sliding-window figure 2.4% worse)."""
    cfg = from_config_dict(load_config_dict(["--config=pretrain", "--config.workdir=unused"]))
    assert cfg.model.max_seq_len == cfg.data.seq_len == 256
    longer = load_config_dict(["--config=pretrain", "--config.workdir=unused", "--config.data.seq_len=512"])
    with pytest.raises(ConfigError, match=r"data.seq_len \(512\) exceeds model.max_seq_len \(256\)"):
        from_config_dict(longer)      # a longer row says which field to raise with it
    # Continued pretraining takes its context from the checkpoint (grown to data.seq_len), not from this config.
    from_config_dict(load_config_dict(["--config=continue_pretrain", "--config.workdir=unused",
                                       "--config.init_from=hf_model", "--config.data.seq_len=1024"]))
