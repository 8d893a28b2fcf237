"""Instruction and preference records, in the layouts people publish them, normalised to two shapes.

  conversation: [{"role": "system"|"user"|"assistant", "content": str}, ...]           (SFT)
  pair:         {"prompt": conversation ending with a user turn, "chosen": str, "rejected": str,
                 "margin": float}                                                     (reward, DPO)

Layouts, detected per file from its first record (or named in the config):
  alpaca     instruction / input / output (Alpaca, BELLE)
  sharegpt   conversations: [{from: human|gpt|system, value}]
  messages   messages: [{role, content}] (OpenAI)
  pairs      prompt + chosen/rejected (or `selected` for chosen), text or message lists; optional margin;
             also LLaMA-Factory / MedicalGPT: conversations + chosen/rejected (a {from, value} turn or text)
  unpaired   messages + boolean label (KTO): loads, but is neither SFT nor pairwise data
Files may be a JSON array or JSON Lines whatever their extension (BELLE ships JSON Lines as .json).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

SFT_FORMATS = ("alpaca", "sharegpt", "messages")
PAIR_FORMATS = ("pairs",)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bot": "assistant", "model": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record is malformed; the message names the file, the record's line and the field."""


def read_json_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) from a JSON array or a JSON Lines file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        # Line numbers of array elements: where each top-level object starts (good enough to find it).
        decoder, starts, i = json.JSONDecoder(), [], text.index("[") + 1
        for _ in records:
            while text[i] in " \t\r\n,":
                i += 1
            starts.append(text.count("\n", 0, i) + 1)
            _, i = decoder.raw_decode(text, i)
        yield from zip(starts, records)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def detect_format(record: dict) -> str:
    if "chosen" in record or "selected" in record:
        return "pairs"
    if "messages" in record and "label" in record:
        return "unpaired"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    raise ValueError(f"unrecognised record layout with fields {sorted(record)}")


def _require(record: dict, field: str, where: str):
    if field not in record:
        raise RecordError(f"{where}: field {field!r} missing")
    return record[field]


def _turns(turns, where: str, field: str) -> list[dict]:
    """[{from|role, value|content}] -> [{role, content}]."""
    if not isinstance(turns, list):
        raise RecordError(f"{where}: field {field!r} must be a list of turns")
    out = []
    for i, t in enumerate(turns):
        speaker = t.get("role", t.get("from")) if isinstance(t, dict) else None
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if speaker not in _ROLES or not isinstance(content, str):
            raise RecordError(f"{where}: field {field!r}[{i}] needs a known role/from and text content/value")
        out.append({"role": _ROLES[speaker], "content": content})
    return out


def to_conversation(record: dict, fmt: str, where: str) -> list[dict]:
    if fmt == "alpaca":
        from jaxllm.data.templates import alpaca_user
        instruction = _require(record, "instruction", where)
        output = _require(record, "output", where)
        return [{"role": "user", "content": alpaca_user(instruction, record.get("input") or "")},
                {"role": "assistant", "content": output}]
    if fmt == "sharegpt":
        conv = _turns(_require(record, "conversations", where), where, "conversations")
    elif fmt == "messages":
        conv = _turns(_require(record, "messages", where), where, "messages")
    else:
        raise RecordError(f"{where}: a {fmt!r} record is not instruction data (expected one of {SFT_FORMATS})")
    if record.get("system") and (not conv or conv[0]["role"] != "system"):
        conv.insert(0, {"role": "system", "content": record["system"]})
    return conv


def _response_text(value, where: str, field: str) -> str:
    """chosen/rejected given as text, as one {from, value} turn, or as a message list (last assistant turn)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _turns([value], where, field)[0]["content"]
    if isinstance(value, list) and value:
        return _turns(value, where, field)[-1]["content"]
    raise RecordError(f"{where}: field {field!r} must be text, a turn or a list of turns")


def to_pair(record: dict, where: str) -> dict:
    chosen = record["chosen"] if "chosen" in record else _require(record, "selected", where)
    rejected = _require(record, "rejected", where)
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _turns(prompt, where, "prompt")
    elif "conversations" in record:
        prompt = _turns(record["conversations"], where, "conversations")
    elif "messages" in record:
        prompt = _turns(record["messages"], where, "messages")
    elif isinstance(chosen, list) and len(chosen) > 1:   # full conversations: the shared prefix is the prompt
        prompt = _turns(chosen[:-1], where, "chosen")
    else:
        raise RecordError(f"{where}: field 'prompt' missing (nor conversations/messages)")
    if record.get("system"):
        prompt = [{"role": "system", "content": record["system"]}] + prompt
    margin = record.get("margin", 0.0)
    if not isinstance(margin, (int, float)):
        raise RecordError(f"{where}: field 'margin' must be a number, got {margin!r}")
    return {"prompt": prompt, "chosen": _response_text(chosen, where, "chosen"),
            "rejected": _response_text(rejected, where, "rejected"), "margin": float(margin)}


def load_sft(paths, fmt: str = "auto", on_error: str = "raise") -> list[list[dict]]:
    """Conversations from instruction files. on_error: "raise" or "skip" (counted and logged)."""
    out, skipped = [], {}
    for path in ([paths] if isinstance(paths, (str, Path)) else paths):
        for where, record, kind in _records(path, fmt):
            try:
                if kind not in SFT_FORMATS:
                    raise ValueError(f"{path}: this is {kind!r} data (preference pairs), not instruction data "
                                     f"(expected one of {SFT_FORMATS}); use configs/reward.py or configs/dpo.py")
                conv = to_conversation(record, kind, where)
                if not any(t["role"] == "assistant" and t["content"].strip() for t in conv):
                    _count(skipped, "no assistant answer (empty response)")
                    continue
                out.append(conv)
            except RecordError:
                if on_error == "raise":
                    raise
                _count(skipped, "malformed")
    _log(paths, len(out), skipped)
    return out


def load_pairs(paths, on_error: str = "raise") -> list[dict]:
    """Preference pairs; chosen == rejected and empty responses are skipped and counted."""
    out, skipped = [], {}
    for path in ([paths] if isinstance(paths, (str, Path)) else paths):
        for where, record, kind in _records(path, "auto"):
            if kind not in PAIR_FORMATS:
                raise ValueError(f"{path}: this is {kind!r} data, not preference pairs (need chosen/rejected)")
            try:
                pair = to_pair(record, where)
            except RecordError:
                if on_error == "raise":
                    raise
                _count(skipped, "malformed")
                continue
            if not pair["chosen"].strip() or not pair["rejected"].strip():
                _count(skipped, "empty response")
            elif pair["chosen"] == pair["rejected"]:
                _count(skipped, "chosen identical to rejected")
            else:
                out.append(pair)
    _log(paths, len(out), skipped)
    return out


def _records(path, fmt: str):
    kind = None if fmt == "auto" else fmt
    for lineno, record in read_json_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise RecordError(f"{where}: a record must be a JSON object")
        if kind is None:
            try:
                kind = detect_format(record)
            except ValueError as e:
                raise RecordError(f"{where}: {e}") from None
        yield where, record, kind


def _count(skipped: dict, reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def _log(paths, kept: int, skipped: dict) -> None:
    detail = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"
    logging.info("records from %s: %d kept; skipped: %s", paths, kept, detail)
