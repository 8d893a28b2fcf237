"""jaxllm: train large language models from scratch in JAX. The public API, re-exported; nothing is
defined here."""
from jaxllm.checkpoint import export_hf, import_hf, load_params, save_params
from jaxllm.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.data import load_documents, lm_pipeline, split_heldout
from jaxllm.losses import bradley_terry, dpo, token_cross_entropy
from jaxllm.model.convert import from_hf, to_hf
from jaxllm.model.resize import resize_vocab
from jaxllm.model.spec import ParamSpec, abstract_params, count_params, init_params, param_specs
from jaxllm.model.transformer import forward, hidden_states
from jaxllm.optim import lr_schedule, make_optimizer
from jaxllm.objectives import score
from jaxllm.steps import (dpo_loss, eval_step_lm, lm_loss, reward_loss, train_step, train_step_dpo, train_step_lm,
                          train_step_reward, train_step_sft)
from jaxllm.tokenizer import Tokenizer, train_tokenizer
from jaxllm.tokenizer.expand import expand_tokenizer
from jaxllm.tokenizer.inspect import text_stats
from jaxllm.trainer import train

__version__ = "0.1.0"
