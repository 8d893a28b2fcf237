"""The inference seam: a checkpoint in any form a command accepts -> params, model config, tokenizer and the
chat template the model was trained with, as one value that generate, eval and serve share.

Checkpoint forms (weights.py): a run workdir (its newest step), one step's directory, a converted checkpoint,
or a Hugging Face directory. The template is the Jinja text the model carries (data/templates.model_template:
chat_template.jinja of a run or a checkpoint, an HF folder's tokenizer_config.json); a model that carries none
(pretrained from scratch) has None.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

from jaxllm import hub, sharding, storage, weights
from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.data.templates import ChatTemplate, model_template
from jaxllm.tokenizer import HFTokenizer, Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True, eq=False)   # eq=False: params are arrays, compared by identity
class InferenceModel:
    params: Any              # nested dict of arrays (a reward model's head too, when saved with the decoder)
    cfg: ModelConfig
    tokenizer: Tokenizer | HFTokenizer
    template: ChatTemplate | None   # the chat template the model was trained with (or its own); None: none


def inference_mesh(fsdp: int = 1, tensor: int = 1) -> Mesh:
    """The mesh of an eval / generate / serve / score command: the training mesh's fields, the data axis taking
    the devices left over (so one device is a trivial mesh and 8 GPUs split a batch 8 ways by default)."""
    return sharding.make_mesh(MeshConfig(data=-1, fsdp=fsdp, tensor=tensor))


def load_for_inference(path: str, *, tokenizer: str | None = None, mesh: Mesh | None = None,
                       compute_dtype: str | None = None, attention_impl: str | None = None) -> InferenceModel:
    """Loads `path` (see the module docstring) for generation, scoring or serving.

    tokenizer: a SentencePiece model replacing the checkpoint's own (required when it carries none).
    mesh: params are loaded sharded over it as training lays them out (MeshConfig's rules: embed over fsdp,
    heads / mlp / vocab over tensor), each process reading what its devices hold; run the model under
    `sharding.use_rules(mesh, MeshConfig().rules)`. None leaves them on the default device.
    compute_dtype, attention_impl: override the checkpoint's model config (e.g. "bfloat16", "xla")."""
    path = hub.resolve_model_path(path)
    description = weights.describe_checkpoint(path)
    if mesh is not None:
        params, cfg, saved_tokenizer = weights.load_params_on_mesh(path, mesh, MeshConfig().rules)
    else:
        params, cfg, saved_tokenizer = weights.load_params(path)
    if not (tokenizer or saved_tokenizer):
        raise ValueError(f"{path} carries no tokenizer; pass one (--tokenizer)")
    overrides = {k: v for k, v in (("compute_dtype", compute_dtype), ("attention_impl", attention_impl))
                 if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
        cfg.validate()
    where = next(description[k] for k in ("step_dir", "params_dir", "hf_dir") if k in description)
    template = model_template(storage.as_path(where).parent if description["kind"] == "params" else where)
    return InferenceModel(params, cfg, load_tokenizer(tokenizer or saved_tokenizer), template)
