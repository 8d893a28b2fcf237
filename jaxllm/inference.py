"""The inference seam: a checkpoint in any form a command accepts -> params, model config, tokenizer and the
chat template the model was trained with, as one value that generate, eval and serve share.

Checkpoint forms (checkpoint.py): a run workdir (its newest step), one step's directory, a converted checkpoint,
or a Hugging Face directory. Only a run records how it was trained, so only a run gives a template, and only
when its objective read chat-formatted data: an `lm` run's config names a template it never used.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import checkpoint
from jaxllm.config import ModelConfig
from jaxllm.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)   # eq=False: params are arrays, compared by identity
class InferenceModel:
    params: Any              # nested dict of arrays (a reward model's head too, when saved with the decoder)
    cfg: ModelConfig
    tokenizer: Tokenizer
    template: str | None     # data/templates.py name the model was post-trained with; None: pretrained or unknown


def load_for_inference(path: str, *, tokenizer: str | None = None, mesh: Mesh | None = None,
                       compute_dtype: str | None = None, attention_impl: str | None = None) -> InferenceModel:
    """Loads `path` (see the module docstring) for generation, scoring or serving.

    tokenizer: a SentencePiece model replacing the checkpoint's own (required when it carries none).
    mesh: params are replicated over it; None leaves them on the default device.
    compute_dtype, attention_impl: override the checkpoint's model config (e.g. "bfloat16", "xla")."""
    description = checkpoint.describe_checkpoint(path)
    params, cfg, saved_tokenizer = checkpoint.load_params(path)
    if not (tokenizer or saved_tokenizer):
        raise ValueError(f"{path} carries no tokenizer; pass one (--tokenizer)")
    overrides = {k: v for k, v in (("compute_dtype", compute_dtype), ("attention_impl", attention_impl))
                 if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
        cfg.validate()
    if mesh is not None:
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    template = None
    if description["kind"] == "run":
        run_dir = Path(description["step_dir"]).parent.parent      # <workdir>/checkpoints/<step>
        run_config = json.loads((run_dir / checkpoint.RUN_CONFIG_FILE).read_text())
        template = None if run_config["objective"] == "lm" else run_config["data"]["template"]
    return InferenceModel(params, cfg, Tokenizer(tokenizer or saved_tokenizer), template)
