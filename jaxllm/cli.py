"""`jaxllm <command>`: parses flags and calls library functions; nothing else lives here.

Training-like commands take `--config=<name or file>[:arg]` (a shipped config such as `pretrain`, or a
path) plus `--config.a.b=value` overrides (ml_collections config_flags); tool-like commands take plain flags.
`--help` works on every command.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

# command -> ("module:function" taking argv and returning an exit code, one-line help). Each room owns its
# command's flag parsing; handlers are imported only when their command runs, so `jaxllm --help` is fast.
COMMANDS = {
    "train": ("jaxllm.cli:cmd_train", "train a model from a config (pretrain, sft, reward, dpo, ... or a file)"),
    "tokenizer": ("jaxllm.tokenizer.cli:main", "train, expand (merge), inspect and compare SentencePiece tokenizers"),
    "convert": ("jaxllm.cli:cmd_convert", "convert between Hugging Face Llama checkpoints and jaxllm checkpoints"),
    "quickstart": ("jaxllm.cli:cmd_quickstart",
                   "the main job: tokenizer + tiny LM on the built-in corpora, offline, on a CPU"),
    "eval": ("jaxllm.eval.cli:main", "evaluate a checkpoint: perplexity (ppl), multiple choice (mcq), judge"),
    "generate": ("jaxllm.eval.cli:generate_main", "sample continuations of prompts from a checkpoint"),
    "serve": ("jaxllm.serve.cli:main", "OpenAI-compatible HTTP server over a checkpoint"),
    "instruct": ("jaxllm.instruct.cli:main", "instruction data: self-instruct through a teacher endpoint"),
    "plan-memory": ("jaxllm.plan_memory_cli:main",
                    "bytes per device (params, optimizer, gradients, activations) for a config and mesh"),
    "data": ("jaxllm.data.cli:main", "data at scale: plan a mixture, prepare token shards, clean and dedup text"),
}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` that ends each flag's line with its default, as every jaxllm command shows them (pass it as
    formatter_class to each parser and sub-parser: argparse does not hand it down). Flags without a default
    (required ones, None) and help that already states its default get nothing added."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or "(default" in text:
            return text
        return text + (" (default: %(default)r)" if isinstance(action.default, str) else " (default: %(default)s)")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for noisy in ("jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Orbax logs through absl, and warns on every params-only restore that a metadata file is absent.
    logging.getLogger("absl").setLevel(logging.ERROR)


def shipped_configs() -> dict[str, Path]:
    """name -> file of every config installed with the package (jaxllm/configs/*.py with a get_config)."""
    folder = Path(importlib.util.find_spec("jaxllm.configs").origin).parent
    return {path.stem: path for path in sorted(folder.glob("*.py")) if "\ndef get_config(" in path.read_text()}


def config_file(spec: str) -> str:
    """`--config`'s value -> `file[:arg]` for config_flags, which loads files only.

    An existing file wins; otherwise `name`, `name.py` (either with `:arg`) is the shipped config of that name,
    so `--config=pretrain` works from any directory."""
    from jaxllm.config import ConfigError

    path, colon, arg = spec.partition(":")
    if os.path.isfile(path):
        return spec
    shipped = shipped_configs()
    name = path.removesuffix(".py")
    if name in shipped:
        return f"{shipped[name]}{colon}{arg}"
    hint = f"; did you mean --config={Path(name).name}?" if Path(name).name in shipped else ""
    raise ConfigError(f"--config={spec}: no such file, and no shipped config named {name!r}{hint} (shipped configs: "
                      f"{', '.join(shipped)})")


def load_config_dict(argv: list[str]):
    """--config=<name or file>[:arg] and its --config.x=... overrides -> the ConfigDict, overrides applied."""
    from absl import flags
    from ml_collections import config_flags

    from jaxllm.config import ConfigError

    values = flags.FlagValues()
    argv = ["jaxllm"] + [f"--config={config_file(a.split('=', 1)[1])}" if a.startswith("--config=") else a
                         for a in argv]
    # config_flags finds the --config.x overrides in sys_argv (default: the process's sys.argv).
    config_flags.DEFINE_config_file("config", None, "config file, optionally with :arg (get_config(arg))",
                                    flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, KeyError, AttributeError) as e:
        raise ConfigError(_explain_override_error(e, argv)) from None
    if values.config is None:
        raise ConfigError(f"--config=<name or file> is required; shipped configs: {', '.join(shipped_configs())}")
    return values.config


def load_config(argv: list[str]):
    """--config=<name or file>[:arg] and its --config.x=... overrides -> a validated Config."""
    from jaxllm.config import from_config_dict

    return from_config_dict(load_config_dict(argv))


def _explain_override_error(error: Exception, argv: list[str]) -> str:
    """ml_collections reports an unknown override as a bare flag error, and a failing get_config as a traceback
    in the message: name the field and suggest fields, or give get_config's own error."""
    text = str(error).strip("'\"")
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return text
    try:
        path, _, arg = spec.partition(":")
        module_spec = importlib.util.spec_from_file_location("_jaxllm_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - get_config itself failed (e.g. a bad :arg): its message, no traceback
        return f"--config={spec}: {e}"
    fields = list(_dotted_fields(config.to_dict()))
    unknown = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
    unknown = [u for u in unknown if u not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"unknown config field {unknown[0]!r}{hint}"
    return text


def _dotted_fields(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        yield prefix + k
        if isinstance(v, dict):
            yield from _dotted_fields(v, prefix + k + ".")


def cmd_train(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print("usage: jaxllm train --config=<name or file>[:arg] [--config.<field>=<value> ...]\n\n"
              f"Shipped configs: {', '.join(shipped_configs())} (e.g. --config=pretrain:model=tiny), or a path to\n"
              "your own config file. Every field can be overridden; jaxllm/config.py documents each.")
        return 0
    from jaxllm import distributed
    from jaxllm.trainer import train
    cfg = load_config(argv)
    distributed.initialize()          # several processes (TPU pod, SLURM, JAXLLM_* env): before any device use
    distributed.log_only_on_process_zero()
    result = train(cfg)
    logging.info("done: step %d, %s", result["step"],
                 ", ".join(f"{k}={v:.4f}" for k, v in result.items() if k.startswith("eval/")))
    return 0


def cmd_convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm convert", description="Hugging Face <-> jaxllm checkpoints",
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    p = sub.add_parser("from-hf", help="Hugging Face Llama (config.json + safetensors) -> jaxllm checkpoint",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--hf_dir", required=True, help="directory with config.json and *.safetensors, or a Hugging "
                   "Face Hub id (its cache; HF_HUB_OFFLINE=1 respected)")
    p.add_argument("--out", required=True, help="jaxllm checkpoint directory to write")
    p = sub.add_parser("to-hf", help="jaxllm checkpoint -> Hugging Face Llama directory",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run workdir, step directory or converted checkpoint")
    p.add_argument("--out", required=True, help="Hugging Face directory to write")
    p.add_argument("--adapter_only", action="store_true", help="a LoRA run's adapters as a PEFT adapter folder "
                   "(adapter_config.json + adapter_model.safetensors) instead of the merged model")
    args = parser.parse_args(argv)
    from jaxllm.weights import export_hf, import_hf
    out = (import_hf(args.hf_dir, args.out) if args.direction == "from-hf"
           else export_hf(args.checkpoint, args.out, adapter_only=args.adapter_only))
    print(f"wrote {out}")
    return 0


def cmd_quickstart(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm quickstart", description=COMMANDS["quickstart"][1],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--workdir", default="runs/quickstart", help="where the run writes everything")
    parser.add_argument("--steps", type=int, default=1200, help="pretraining steps")   # quickstart.PRETRAIN_STEPS
    parser.add_argument("--vocab_size", type=int, default=0, help="tokenizer vocabulary (0: the pretrain config's)")
    parser.add_argument("--post_steps", type=int, default=120, help="steps of SFT and the reward model (DPO: half)")
    parser.add_argument("--stages", default="pretrain,sft,reward,dpo,rl", help="comma-separated stages to run")
    args = parser.parse_args(argv)
    from jaxllm.quickstart import run_quickstart
    run_quickstart(args.workdir, steps=args.steps, vocab_size=args.vocab_size, post_steps=args.post_steps,
                   stages=tuple(args.stages.split(",")))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: jaxllm <command> [flags]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<12} {text}")
        print("\n`jaxllm <command> --help` lists a command's flags.")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"jaxllm: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
              file=sys.stderr)
        return 2
    _setup_logging()
    module, function = COMMANDS[command][0].split(":")
    try:
        return getattr(importlib.import_module(module), function)(rest)
    except user_errors() as e:
        # A user error: say what and where, without a traceback from deep inside JAX.
        print(f"jaxllm {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # Ctrl-C: one line (train's says where it saved), exit status 130 as a shell gives an interrupted command.
        print(f"jaxllm {command}: {e or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 130


def user_errors() -> tuple[type[BaseException], ...]:
    """The one rule for every command: these exceptions are the user's input or environment (a bad value or
    file, an endpoint that refuses), and their messages name the file, field or URL at fault, so the command
    prints that line and exits 1. Anything else is a bug and keeps its traceback."""
    from jaxllm.config import ConfigError
    from jaxllm.eval.client import ClientError   # standard library only: cheap to import

    return ConfigError, ValueError, OSError, ClientError
