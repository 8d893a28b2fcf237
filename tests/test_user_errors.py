"""What a new user meets when an input is broken (issue 12, items 14 and 18): each case runs the user's command
through `jaxllm.cli.main`, and checks the exit status, that the message is one line naming the file and field at
fault (no traceback), and that nothing was written or claimed that does not exist."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jax
import pytest

from jaxllm.cli import main
from jaxllm.config import model_config_from_dict
from jaxllm.model import convert
from jaxllm.model.spec import init_params

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    """(exit status, stdout, stderr) of `jaxllm argv...` in this process."""
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def assert_one_line_error(err: str, *named: str):
    lines = [line for line in err.splitlines() if line.startswith("jaxllm ")]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for text in named:
        assert text in lines[0], (text, lines[0])


def saved_steps(workdir: Path) -> list[str]:
    return [d.name for d in (workdir / "checkpoints").glob("[0-9]*")]


@pytest.fixture
def hf_dir(tmp_path, tokenizer_path):
    """A tiny Llama written by our own exporter (config.json, model.safetensors, tokenizer.model)."""
    cfg = model_config_from_dict(dict(vocab_size=512, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                      head_dim=16, mlp_dim=64, max_seq_len=64))
    return convert.to_hf(init_params(cfg, jax.random.key(0)), cfg, tmp_path / "hf", tokenizer_path=tokenizer_path)


# ----------------------------------------------------------------------------------------------------
# Item 14: tracebacks that become one line.

def test_truncated_safetensors_is_named_by_convert_and_by_init_from(capsys, tmp_path, hf_dir, english_corpus):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])   # an interrupted download
    status, _, err = run(capsys, "convert", "from-hf", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'out'}")
    assert status == 1 and not (tmp_path / "out").exists()
    assert_one_line_error(err, str(weights), "damaged safetensors file", "truncated")
    status, _, err = run(capsys, "train", "--config=pretrain:model=tiny", f"--config.workdir={tmp_path / 'run'}",
                         f"--config.init_from={hf_dir}", f"--config.data.sources={english_corpus}",
                         "--config.train.steps=1")
    assert status == 1 and not saved_steps(tmp_path / "run")
    assert_one_line_error(err, str(weights), "damaged safetensors file")


def test_llama_config_without_architectures_is_read_by_its_model_type(capsys, tmp_path, hf_dir):
    config_path = hf_dir / "config.json"
    hf_config = json.loads(config_path.read_text())
    del hf_config["architectures"]                    # hand-written and older config.json files lack it
    config_path.write_text(json.dumps(hf_config))
    status, out, err = run(capsys, "convert", "from-hf", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'out'}")
    assert status == 0, err
    assert f"wrote {tmp_path / 'out'}" in out
    params, cfg = convert.from_hf(hf_dir)
    assert cfg.vocab_size == 512 and cfg.num_layers == 1 and params["embed"]["embedding"].shape == (512, 32)

    config_path.write_text(json.dumps({**hf_config, "model_type": "gpt2"}))
    status, _, err = run(capsys, "convert", "from-hf", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'out2'}")
    assert status == 1 and not (tmp_path / "out2").exists()
    assert_one_line_error(err, str(config_path), "model_type 'gpt2'", "architectures")
    config_path.write_text(json.dumps({k: v for k, v in hf_config.items() if k != "hidden_size"}))
    status, _, err = run(capsys, "convert", "from-hf", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'out3'}")
    assert status == 1
    assert_one_line_error(err, str(config_path), "missing field hidden_size")


def test_tuple_field_given_a_scalar_names_the_field_before_anything_is_written(capsys, tmp_path):
    workdir = tmp_path / "run"
    status, _, err = run(capsys, "train", "--config=pretrain:model=tiny", f"--config.workdir={workdir}",
                         "--config.data.sources=5")
    assert status == 1 and not workdir.exists()
    # The hint is a command that works: a file named 5, quoted so the command line keeps it a string.
    assert_one_line_error(err, "'data.sources'", "list of str", "got 5 (int)", "--config.data.sources=\"'5'\"")


def test_label_smoothing_on_an_objective_without_next_token_targets_is_refused(capsys, tmp_path):
    """train.label_smoothing reaches lm and sft; a reward run would silently ignore it, so it is an error."""
    workdir = tmp_path / "run"
    status, _, err = run(capsys, "train", "--config=reward", f"--config.workdir={workdir}",
                         "--config.init_from=scratch", "--config.train.label_smoothing=0.1")
    assert status == 1 and not workdir.exists()
    assert_one_line_error(err, "train.label_smoothing", "'reward'", "dpo.label_smoothing")


def test_a_file_that_is_no_sentencepiece_model_is_named_without_protobuf_internals(capsys, tmp_path,
                                                                                   english_corpus):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"<html>404 Not Found</html>\n" * 8)      # what a failed download leaves behind
    status, _, err = run(capsys, "tokenizer", "show", f"--tokenizer={bad}", "hello")
    assert status == 1 and "INTERNAL" not in err and "ParseFromArray" not in err
    assert_one_line_error(err, str(bad), "is not a SentencePiece model")
    hf_json = tmp_path / "tokenizer.json"
    hf_json.write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    status, _, err = run(capsys, "train", "--config=pretrain:model=tiny", f"--config.workdir={tmp_path / 'run'}",
                         f"--config.tokenizer={hf_json}", f"--config.data.sources={english_corpus}")
    assert status == 1 and not saved_steps(tmp_path / "run")
    assert_one_line_error(err, str(hf_json), "Hugging Face tokenizer.json")


@pytest.fixture
def refusing_endpoint(tokenizer_path):
    """A real `jaxllm serve` server; requests for a model it does not serve get HTTP 404 (no retries)."""
    from jaxllm.serve.server import Server
    from jaxllm.tokenizer import Tokenizer
    cfg = model_config_from_dict(dict(vocab_size=512, d_model=16, num_layers=1, num_heads=1, num_kv_heads=1,
                                      head_dim=16, mlp_dim=32, max_seq_len=64, attention_impl="xla"))
    server = Server(init_params(cfg, jax.random.key(0)), cfg, Tokenizer(tokenizer_path), model_name="served",
                    port=0).start()
    yield server.url
    server.shutdown()


def test_judge_and_self_instruct_exit_nonzero_when_every_request_fails(capsys, tmp_path, refusing_endpoint):
    questions, answers = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "class": "generic"}) + "\n" for q in ("Hi?", "Why?")))
    answers.write_text("".join(json.dumps({"question_id": str(i), "text": t}) + "\n" for i, t in enumerate("ab")))
    out = tmp_path / "judge"
    status, stdout, err = run(capsys, "eval", "judge", f"--questions={questions}", f"--answers_a={answers}",
                              f"--answers_b={answers}", f"--judge_url={refusing_endpoint}", "--judge_model=absent",
                              f"--out={out}")
    assert status == 1 and "wrote" not in stdout
    assert_one_line_error(err, "all 4 judge calls failed", "4 x 404", "nothing was written")
    assert not (out / "summary.json").exists() and not (out / "judgements.jsonl").exists()

    seeds, prompt = tmp_path / "seed_tasks.jsonl", tmp_path / "prompt.txt"
    seeds.write_text(json.dumps({"instruction": "Name a colour.", "instances": [{"input": "", "output": "Red"}]}))
    prompt.write_text("Come up with 20 diverse task instructions:\n")
    data = tmp_path / "instructions.jsonl"
    status, stdout, err = run(capsys, "instruct", "generate", f"--seed_tasks={seeds}", f"--prompt_file={prompt}",
                              f"--teacher_url={refusing_endpoint}", "--teacher_model=absent", "--num=5",
                              "--max_requests=3", f"--out={data}")
    assert status == 1 and "kept" not in stdout
    assert_one_line_error(err, "all 3 requests to the teacher failed", "404")
    assert not data.exists() or data.read_text() == ""


# ----------------------------------------------------------------------------------------------------
# Item 18: what a new user reads first.

HELP_DEFAULTS = {   # a command's --help, and a flag default it must show
    ("tokenizer", "train"): "(default: 8000)", ("tokenizer", "stats"): "(default: 'text')",
    ("convert", "from-hf"): None, ("quickstart",): "(default: 1200)", ("eval", "ppl"): "(default: 8)",
    ("eval", "mcq"): "(default: 5)", ("eval", "judge"): "(default: 512)", ("generate",): "(default: 64)",
    ("serve",): "(default: 8000)", ("data", "plan"): "(default: 1000)", ("data", "prepare"): "(default: ",
    ("data", "clean"): "(default: 'any')", ("instruct", "generate"): "(default: 3072)",
    ("plan-memory",): "(default: False)",
}


@pytest.mark.parametrize("command", list(HELP_DEFAULTS), ids=" ".join)
def test_help_shows_each_flags_default(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())          # argparse wraps lines
    assert exit_.value.code == 0
    if HELP_DEFAULTS[command]:
        assert HELP_DEFAULTS[command] in text
    assert "(default: None)" not in text and "(default: )" not in text


def test_local_launcher_runs_without_a_venv_in_the_checkout(tmp_path):
    """A pip-installed jaxllm and a copy of launch/ without .venv beside it: the installed command runs; with no
    jaxllm anywhere the launcher says how to point it at one."""
    launcher = tmp_path / "launch" / "local.sh"
    launcher.parent.mkdir()
    shutil.copy(REPO / "launch" / "local.sh", launcher)
    installed = Path(shutil.which("jaxllm") or (REPO / ".venv" / "bin" / "jaxllm"))
    if not installed.exists():
        pytest.skip("no installed `jaxllm` command to find")
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": f"{installed.parent}:/usr/bin:/bin",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(["bash", str(launcher), "pretrain", "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "usage: jaxllm train" in out.stdout, out.stderr
    bare = tmp_path / "bin"       # a PATH with bash and nothing else: no jaxllm, no python3
    bare.mkdir()
    (bare / "bash").symlink_to(shutil.which("bash"))
    out = subprocess.run([str(bare / "bash"), str(launcher), "pretrain"], capture_output=True, text=True,
                         env={**env, "PATH": str(bare)}, cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "no jaxllm found" in out.stderr and "PYTHON=" in out.stderr


def test_plan_memory_plans_a_preset_with_its_own_vocabulary_and_small_models_in_millions(capsys):
    status, out, _ = run(capsys, "plan-memory", "--config=pretrain:model=llama2-7b")
    assert status == 0
    # Llama 2 7B: 32000 rows (the config's vocab_size 0 means "the tokenizer's", and no tokenizer is given).
    assert "6.74B parameters" in out and "vocab 32000: the llama2-7b preset's" in out
    status, out, _ = run(capsys, "plan-memory", "--config=pretrain:model=tiny")
    # By hand: the 6000-piece tokenizer pretrain builds, untied embedding and head (2 x 6000 x 64); per layer
    # q/o 64x64, k/v 64x32 (2 KV heads of 16), a 3 x 64x192 MLP and two norms; one final norm.
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64
    params = 2 * 6000 * 64 + 2 * layer + 64
    assert status == 0 and f"{params / 1e6:.2f}M parameters" in out and "0.00B" not in out
    status, out, _ = run(capsys, "plan-memory", "--config=pretrain:model=llama2-7b", "--config.model.vocab_size=1000")
    params = 6_738_415_616 - 2 * 31_000 * 4096         # an explicit vocabulary wins
    assert status == 0 and f"{params / 1e9:.2f}B parameters" in out and "vocab 1000: model.vocab_size" in out
