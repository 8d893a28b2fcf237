"""jaxllm: train large language models from scratch in JAX. The public API, re-exported lazily.

Nothing is defined here. Each public name is imported from its module on first use (PEP 562), so
`import jaxllm` and `jaxllm --help` stay fast and load no JAX, Orbax or Grain until a name that needs them
is touched.
"""
from __future__ import annotations

from jaxllm.lazy import lazy_exports

__version__ = "0.1.0"

# module -> the public names it provides.
_EXPORTS = {
    "jaxllm.config": ("Config", "ConfigError", "DataConfig", "DPOConfig", "MeshConfig", "ModelConfig",
                      "OptimConfig", "RewardConfig", "TrainConfig"),
    "jaxllm.weights": ("export_hf", "import_hf", "load_params", "save_params"),
    "jaxllm.inference": ("InferenceModel", "load_for_inference"),
    "jaxllm.data": ("load_documents", "lm_pipeline", "split_heldout"),
    "jaxllm.model.convert": ("from_hf", "to_hf"),
    "jaxllm.model.resize": ("resize_vocab",),
    "jaxllm.model.spec": ("ParamSpec", "abstract_params", "count_params", "init_params", "param_specs"),
    "jaxllm.model.transformer": ("forward", "hidden_states"),
    "jaxllm.model.generate": ("SamplingParams", "generate", "generate_text"),
    "jaxllm.optim": ("lr_schedule", "make_optimizer"),
    "jaxllm.objectives.lm": ("lm_loss", "token_cross_entropy"),
    "jaxllm.objectives.reward": ("bradley_terry", "reward_loss", "score"),
    "jaxllm.objectives.dpo": ("dpo", "dpo_loss"),
    "jaxllm.steps": ("eval_step", "init_train_state", "train_step"),
    "jaxllm.tokenizer": ("HFTokenizer", "Tokenizer", "load_tokenizer", "train_tokenizer"),
    "jaxllm.tokenizer.expand": ("expand_tokenizer",),
    "jaxllm.tokenizer.inspect": ("text_stats",),
    "jaxllm.trainer": ("train",),
}
__getattr__, __all__ = lazy_exports("jaxllm", globals(), _EXPORTS)


def __dir__():
    return sorted(list(globals()) + __all__)
