"""The rewards of objective "rl" (rl.py): a jaxllm reward model scored in this process (reward.model), Python
functions "module:function" (reward.functions) and an OpenAI-compatible judge endpoint (reward.judge_url),
combined with reward.weights in that order; each source's rewards are logged under its name."""
from __future__ import annotations

import importlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from jaxllm.config import Config, ConfigError


class RewardSources:
    """Every configured reward, each a function (prompts, completions, completion_ids, **fields) -> (n,)."""

    def __init__(self, cfg: Config):
        self.sources: dict[str, Callable] = {}
        if cfg.reward.model:
            self.sources["reward_model"] = reward_model_scorer(cfg.reward.model, cfg)
        for name in cfg.reward.functions:
            self.sources[name.rsplit(":", 1)[1]] = import_function(name)
        if cfg.reward.judge_url:
            self.sources["judge"] = JudgeReward(cfg.reward.judge_url, cfg.reward.judge_model)
        if not self.sources:
            raise ConfigError("objective 'rl' needs a reward: --config.reward.model=<reward run>, "
                              "--config.reward.functions=\"('module:function',)\" and/or "
                              "--config.reward.judge_url=<http://host:port/v1>")
        self.weights = dict(zip(self.sources, cfg.reward.weights or [1.0] * len(self.sources)))

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 fields: dict[str, list]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(the weighted sum, each source's rewards)."""
        each = {}
        for name, fn in self.sources.items():
            values = np.asarray(fn(prompts, completions, completion_ids=completion_ids, **fields), np.float32)
            if values.shape != (len(completions),):
                raise ValueError(f"reward {name!r} returned shape {values.shape} for {len(completions)} completions")
            each[name] = values
        total = sum(self.weights[name] * values for name, values in each.items())
        return np.asarray(total, np.float32), each


def import_function(name: str) -> Callable:
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.functions: cannot import {name!r} ({e})") from None


def reward_model_scorer(path: str, cfg: Config) -> Callable:
    """A jaxllm reward model (its own tokenizer and chat template) scoring completions in this process."""
    from jaxllm.inference import load_for_inference
    from jaxllm.objectives.reward import score
    model = load_for_inference(path)
    if "reward_head" not in model.params:
        raise ConfigError(f"reward.model={path} is not a reward model (no reward_head); train one with "
                          f"configs/reward.py")
    template = model.template or "chat"

    def rewards(prompts, completions, **_):
        return score(model.params, model.cfg, model.tokenizer, prompts, completions, template=template,
                     seq_len=cfg.data.seq_len)
    return rewards


JUDGE_PROMPT = ("Rate how well the answer responds to the request, from 0 (useless or harmful) to 10 (excellent). "
                "Reply with the number only.\n\n[Request]\n{prompt}\n\n[Answer]\n{completion}")


def parse_rating(text: str) -> float | None:
    """The first number of a judge's reply when it lies in [0, 10] ("8", "8/10", "Rating: 7.5"), else None."""
    match = re.search(r"-?\d+(?:\.\d+)?", text)
    if match is None:
        return None
    value = float(match.group())
    return value if 0 <= value <= 10 else None


class JudgeReward:
    """An OpenAI-compatible chat endpoint (jaxllm serve, vLLM, OpenAI; eval/client.py, its key from
    OPENAI_API_KEY) rates each completion 0-10 at temperature 0, `workers` requests at a time; the reward is
    rating / 10. A reply without a rating scores 0 and is counted in a warning. Resuming is exact only as far
    as the endpoint answers the same request the same way."""

    def __init__(self, url: str, model: str, workers: int = 8):
        from jaxllm.eval.client import ChatClient
        self.client, self.workers = ChatClient(url, model), workers

    def rate(self, prompt: str, completion: str) -> float | None:
        reply = self.client.chat([{"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt,
                                                                                  completion=completion)}])
        return parse_rating(reply)

    def __call__(self, prompts, completions, **_) -> list[float]:
        with ThreadPoolExecutor(self.workers) as pool:
            ratings = list(pool.map(self.rate, prompts, completions))
        unrated = sum(r is None for r in ratings)
        if unrated:
            logging.warning("reward judge %s: %d of %d replies carried no rating in [0, 10]; scored 0",
                            self.client.url, unrated, len(ratings))
        return [0.0 if r is None else r / 10 for r in ratings]
