"""What an objective brings to the shared trainer: its loss, its data, its parameters and its report.

One objective = one loss (losses.py / steps.py) + one pipeline (data/) + the pieces below; the trainer looks
an objective up by `cfg.objective` and never branches on it. A new objective adds a builder to OBJECTIVES.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable

import jax

from jaxllm.config import Config
from jaxllm.data import load_documents, lm_pipeline, split_heldout
from jaxllm.model.spec import param_specs
from jaxllm.steps import lm_loss


@dataclasses.dataclass
class Objective:
    loss_fn: Callable                      # (params, batch, frozen) -> (loss_sum, sums incl. "count")
    specs: dict                            # ParamSpec tree of the trained parameters (decoder + any heads)
    train_batches: Any                     # checkpointable iterator of per-process numpy batches
    eval_batches: Callable[[], Iterable]   # a fresh pass over the held-out batches
    report: Callable[[dict], dict]         # summed eval sums -> {"eval/...": value}
    # Parameters that exist only in this objective (a reward head) are added to loaded decoder weights.
    extend_params: Callable[[dict, jax.Array], dict] = lambda params, key: params
    frozen: dict = dataclasses.field(default_factory=dict)   # read by the loss, never trained or saved
    eval_hook: Callable[[int, dict, str], dict] | None = None  # (step, params, workdir) -> extra metrics


def lm_documents(cfg: Config) -> tuple[list[str], list[str]]:
    """Training and held-out documents of an LM run."""
    data = cfg.data
    docs = load_documents(data.sources, jsonl_field=data.jsonl_field, text_split=data.text_split)
    if data.eval_sources:
        return docs, load_documents(data.eval_sources, jsonl_field=data.jsonl_field, text_split=data.text_split)
    return split_heldout(docs, data.eval_fraction, cfg.train.seed)


def lm_report(sums: dict) -> dict:
    loss = sums["loss"] / sums["count"]
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": sums["count"]}


def build_lm(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """Next-token prediction on packed rows of documents."""
    docs, eval_docs = lm_documents(cfg)
    pipeline = functools.partial(lm_pipeline, tokenizer=tokenizer, seq_len=cfg.data.seq_len, batch_size=batch_size,
                                 add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos, process_index=process_index,
                                 process_count=process_count)
    return Objective(
        loss_fn=functools.partial(lm_loss, model_cfg=cfg.model, z_loss=cfg.train.z_loss),
        specs=param_specs(cfg.model),
        train_batches=pipeline(docs, seed=cfg.train.seed),
        eval_batches=lambda: pipeline(eval_docs, seed=0, shuffle=False, repeat=False),
        report=lm_report,
    )


OBJECTIVES: dict[str, Callable[..., Objective]] = {"lm": build_lm}


def build(cfg: Config, tokenizer, **kw) -> Objective:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective {cfg.objective!r} is unknown; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.objective](cfg, tokenizer, **kw)
