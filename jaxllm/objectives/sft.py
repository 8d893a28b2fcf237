"""Supervised fine-tuning (instruction tuning): next-token loss on the assistant's tokens only.

SFT is the LM objective on other rows: its loss is lm.py's `lm_loss` unchanged, and what makes it SFT is the
data (data/chat_pipeline.py): whole samples packed into rows whose loss mask covers the answers only, as the
run's chat template renders them (data/templates.py: data.template, "auto" = init_from's own).
"""
from __future__ import annotations

import functools

from jaxllm.config import Config
from jaxllm.data.chat_pipeline import encode_sft, sft_pipeline, train_and_eval_records
from jaxllm.data.formats import load_sft
from jaxllm.data.templates import run_template
from jaxllm.model.spec import param_specs
from jaxllm.objectives import Objective
from jaxllm.objectives.lm import eval_step, lm_report, train_step

__all__ = ["eval_step", "make_objective", "train_step"]


def make_objective(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """Instruction tuning on data.train's conversations, samples packed whole."""
    data = cfg.data
    train_convs, eval_convs = train_and_eval_records(cfg, functools.partial(load_sft, fmt=data.format,
                                                                            on_error=data.on_error))
    encode = functools.partial(encode_sft, tokenizer=tokenizer, template=run_template(data.template, cfg.init_from),
                               seq_len=data.seq_len, overlong=data.overlong)
    train_samples, eval_samples = encode(train_convs), encode(eval_convs)
    pipeline = functools.partial(sft_pipeline, seq_len=data.seq_len, batch_size=batch_size, pack=data.pack,
                                 process_index=process_index, process_count=process_count)
    return Objective(
        train_step=train_step, eval_step=eval_step,
        loss_settings=dict(model_cfg=cfg.model, label_smoothing=cfg.train.label_smoothing,
                           smoothing_prior=cfg.train.smoothing_prior),
        specs=param_specs(cfg.model),
        train_batches=pipeline(train_samples, seed=cfg.train.seed),
        eval_batches=lambda: pipeline(eval_samples, seed=0, shuffle=False, repeat=False),
        report=lm_report,
    )
