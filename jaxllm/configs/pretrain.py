"""Next-token pretraining of a Llama-style decoder on packed rows.

Run (tiny model on the built-in corpora, CPU, a few minutes):
  jaxllm train --config=pretrain:model=tiny --config.workdir=/tmp/run --config.train.steps=200

`:model=<preset>` picks the architecture (configs/presets.py): tiny (default), 125m, tinyllama-1.1b,
llama2-7b; e.g. `jaxllm train --config=pretrain:model=125m --config.workdir=runs/125m`. Every field of the
dataclasses in jaxllm/config.py is here, at the default documented there unless stated below, and can be
overridden with `--config.<a>.<b>=<value>` (e.g. `--config.data.sources='["corpus/"]'`). A second run with
the same workdir resumes from its newest checkpoint.
"""
from jaxllm.config import Config, ModelConfig, as_config_dict


def parse_arg(arg: str, known: tuple[str, ...] = ("model",)) -> dict:
    """'model=tiny,stage=2' -> {'model': 'tiny', 'stage': '2'}; a key outside `known` is an error, not ignored."""
    pairs = [kv.split("=", 1) for kv in arg.split(",") if kv] if arg else []
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in known:
            raise ValueError(f"config argument {'='.join(pair)!r}: expected key=value, key one of {', '.join(known)}")
    return dict(pairs)


def get_config(arg: str = ""):
    model = parse_arg(arg).get("model", "tiny")
    c = config_for_model(model)
    if model == "tiny":   # pretraining from scratch on a CPU (the post-training configs keep the base's batch)
        # A tiny model learns more per second from more, smaller steps: at equal wall time on a held-out novel,
        # batch 8 beat 16 by 0.14 bits/character (benchmarks/RESULTS.md, issue 18).
        c.train.batch_size = 8
        c.optim.lr = 2e-3    # and those steps take a larger peak rate: 2e-3 beat 1e-3 at batch 8 by 0.08
        # A smaller vocabulary: a cheaper output head (most of a d64 model's FLOPs) and fewer corpus-specific
        # merges; 6000 pieces beat 8000 by another 0.13 bits/character in the same comparison.
        c.tokenizer_vocab_size = 6000
    return c


def config_for_model(model: str):
    """This config for the preset `model`: also the base of the post-training configs (sft.py, reward.py, ...)."""
    tiny = model == "tiny"
    c = as_config_dict(Config(model=ModelConfig.preset(model)))   # every field: the preset, then the defaults
    c.model.vocab_size = 0           # the tokenizer's vocabulary size (the preset's is only its reference size)
    if tiny:
        # Two layers, on a CPU: unrolled they run 1.2x faster than under lax.scan (no stacked residual buffers
        # to zero, slice and update) and compile as fast (benchmarks/RESULTS.md, 2026-12-03).
        c.model.scan_layers = False
    else:
        c.model.compute_dtype = "bfloat16"   # accelerators: bf16 matmuls, fp32 parameters and optimizer
        c.model.remat = "dots"               # recompute all but the matmuls in the backward pass
    c.data.sources = ("builtin:peoples_daily", "builtin:reviews", "builtin:pydoc")  # files, dirs, globs, builtin:NAME
    c.data.seq_len = 256 if tiny else 2048        # tokens per packed row
    if tiny:   # the preset's 512: a context the model never trains at; windows past 256 scored a novel 0.3% worse
        c.model.max_seq_len = c.data.seq_len      # eval ppl's windows and generation stop at the trained length
    c.optim.lr = 1e-3 if tiny else 3e-4           # peak learning rate: small models take a larger one
    c.optim.warmup_steps = 50 if tiny else 2000   # linear warmup from 0
    c.train.steps = 300 if tiny else 100_000      # optimizer updates
    c.train.batch_size = 16 if tiny else 256      # global batch, in packed rows of seq_len tokens
    c.train.z_loss = 1e-4            # log(Z)^2 penalty (PaLM): keeps pretraining logits from drifting
    return c
