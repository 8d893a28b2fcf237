"""jaxllm: train large language models from scratch in JAX. The public API, re-exported; nothing is
defined here."""
from jaxllm.checkpoint import export_hf, import_hf, load_params, save_params
from jaxllm.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.data import load_documents, lm_pipeline, split_heldout
from jaxllm.model.convert import from_hf, to_hf
from jaxllm.model.resize import resize_vocab
from jaxllm.model.spec import ParamSpec, abstract_params, count_params, init_params, param_specs
from jaxllm.model.transformer import forward, hidden_states
from jaxllm.optim import lr_schedule, make_optimizer
from jaxllm.objectives.dpo import dpo, dpo_loss
from jaxllm.objectives.lm import lm_loss, token_cross_entropy
from jaxllm.objectives.reward import bradley_terry, reward_loss, score
from jaxllm.steps import eval_step, train_step
from jaxllm.tokenizer import Tokenizer, train_tokenizer
from jaxllm.tokenizer.expand import expand_tokenizer
from jaxllm.tokenizer.inspect import text_stats
from jaxllm.trainer import train

__version__ = "0.1.0"
