"""Prompt templates shared by SFT, generation, serving and evaluation, so a model is always prompted the
way it was trained.

A conversation is rendered into segments: text, whether it carries loss (assistant turns only), and
whether the tokenizer's end-of-sequence id follows it (the end of every assistant turn, so the model learns
to stop). Generation renders the same turns up to the open assistant prefix.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    system: str            # default system text ("" = none); formatted into system_format
    system_format: str     # "{content}" -> text before the first user turn
    user_format: str       # "{content}" -> text of a user turn
    assistant_prefix: str  # text that opens an assistant turn (prompt side, no loss)
    assistant_suffix: str  # text after an assistant turn's content (loss side), before the eos id


ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")
ALPACA_ZH_SYSTEM = "下面是一条描述任务的指令。请写出恰当完成该请求的回答。"

TEMPLATES = {
    # Stanford Alpaca's prompt (the no-input form; an input is folded into the instruction, see alpaca_user).
    "alpaca": Template("alpaca", ALPACA_SYSTEM, "{content}\n\n", "### Instruction:\n{content}\n\n",
                       "### Response:\n", ""),
    # The same structure in Chinese (as used by Chinese-Alpaca / BELLE style SFT).
    "alpaca_zh": Template("alpaca_zh", ALPACA_ZH_SYSTEM, "{content}\n\n", "### 指令：\n{content}\n\n",
                          "### 回答：\n", ""),
    # A plain multi-turn chat template; plain-text role markers work with any tokenizer, and the
    # tokenizer's own eos id (not a string) ends each assistant turn.
    "chat": Template("chat", "", "<|system|>\n{content}\n", "<|user|>\n{content}\n", "<|assistant|>\n", "\n"),
}


@dataclasses.dataclass(frozen=True)
class Segment:
    text: str
    train: bool            # carries loss
    eos_after: bool = False


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def alpaca_user(instruction: str, input_text: str = "", template: str = "alpaca") -> str:
    """Alpaca/BELLE records: the optional input follows the instruction in the user turn."""
    if not input_text:
        return instruction
    label = "### Input:" if template == "alpaca" else "### 输入："
    return f"{instruction}\n\n{label}\n{input_text}"


def render(messages: Sequence[dict], template: Template | str, *, add_generation_prompt: bool = False,
           system: str | None = None) -> list[Segment]:
    """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...] -> segments.

    With add_generation_prompt the result ends with an open assistant prefix (for generation)."""
    t = get_template(template) if isinstance(template, str) else template
    segments: list[Segment] = []
    sys_text = system if system is not None else t.system
    if messages and messages[0]["role"] == "system":
        sys_text, messages = messages[0]["content"], messages[1:]
    if sys_text:
        segments.append(Segment(t.system_format.format(content=sys_text), False))
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "user":
            segments.append(Segment(t.user_format.format(content=content), False))
        elif role == "assistant":
            segments.append(Segment(t.assistant_prefix, False))
            segments.append(Segment(content + t.assistant_suffix, True, eos_after=True))
        else:
            raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
    if add_generation_prompt:
        segments.append(Segment(t.assistant_prefix, False))
    return segments


def render_prompt(messages: Sequence[dict], template: Template | str, system: str | None = None) -> str:
    """The text a generator is given: the conversation so far plus the open assistant prefix."""
    return "".join(s.text for s in render(messages, template, add_generation_prompt=True, system=system))


def encode_segments(segments: Sequence[Segment], tokenizer, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """(token ids, loss mask over those ids: 1 where the token is a training target)."""
    ids: list[int] = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
    mask: list[int] = [0] * len(ids)
    for seg in segments:
        piece = tokenizer.encode(seg.text) if seg.text else []
        if seg.eos_after:
            piece = piece + [tokenizer.eos_id]
        ids += piece
        mask += [int(seg.train)] * len(piece)
    return ids, mask
