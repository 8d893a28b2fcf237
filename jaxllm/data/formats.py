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
from typing import Callable, Iterator

SFT_FORMATS = ("alpaca", "sharegpt", "messages")
PAIR_FORMATS = ("pairs",)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bot": "assistant", "model": "assistant", "system": "system"}


NOT_RECORDS = "not records"   # the reason of a .json file that holds one object (metadata, nested data)


class RecordError(ValueError):
    """A record is malformed; the message names the file, the record's line and the field.

    `reason` is the short, countable cause ("field 'output' is not text"): with on_error="skip" the record is
    skipped and counted under it."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


def bad_field(where: str, field: str, value) -> RecordError:
    """A field of the wrong type: the message shows what was found, the reason names the field."""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return RecordError(f"{where}: field {field!r} must be text, got {type(value).__name__} {shown}",
                       f"field {field!r} is not text")


def read_json_records(path: str | Path, *, on_bad_line: Callable[[RecordError, int], None] | None = None
                      ) -> Iterator[tuple[int, object]]:
    """(line number, record) from a JSON array or a JSON Lines file (BOM, CRLF allowed).

    A line of JSON Lines that does not parse raises a RecordError naming file:line, or is given to
    `on_bad_line(error, lineno)` (which counts it) and left out; a JSON array that does not parse, or a file
    holding one JSON object, always raises."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    yield from parse_json_records(path.read_text(encoding="utf-8-sig"), path, on_bad_line=on_bad_line)


def parse_json_records(text: str, path, *, on_bad_line: Callable[[RecordError, int], None] | None = None
                       ) -> Iterator[tuple[int, object]]:
    """`read_json_records` on text already read (the documents reader decodes files its own way)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}: invalid JSON ({e.msg})", "invalid JSON") from None
        # Line numbers of array elements: where each top-level object starts (good enough to find it).
        decoder, starts, i = json.JSONDecoder(), [], text.index("[") + 1
        for _ in records:
            while text[i] in " \t\r\n,":
                i += 1
            starts.append(text.count("\n", 0, i) + 1)
            _, i = decoder.raw_decode(text, i)
        yield from zip(starts, records)
        return
    seen_record = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if not seen_record and _is_one_object(text):
                raise RecordError(f"{path}: holds one JSON object, not records (a JSON array of objects or "
                                  f"JSON Lines)", NOT_RECORDS) from None
            error = RecordError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})", "invalid JSON")
            if on_bad_line is None:
                raise error from None
            on_bad_line(error, lineno)
            continue
        seen_record = True
        yield lineno, record


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


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
        raise RecordError(f"{where}: field {field!r} missing", f"field {field!r} missing")
    return record[field]


def _text(record: dict, field: str, where: str, *, optional: bool = False) -> str:
    """The string under `field`; an optional field may be absent or null (then "")."""
    value = record.get(field) if optional else _require(record, field, where)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise bad_field(where, field, value)
    return value


def _turns(turns, where: str, field: str) -> list[dict]:
    """[{from|role, value|content}] -> [{role, content}]."""
    if not isinstance(turns, list):
        raise RecordError(f"{where}: field {field!r} must be a list of turns, got {type(turns).__name__}",
                          f"field {field!r} is not a list of turns")
    out = []
    for i, t in enumerate(turns):
        speaker = t.get("role", t.get("from")) if isinstance(t, dict) else None
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if not isinstance(speaker, str) or speaker not in _ROLES or not isinstance(content, str):
            raise RecordError(f"{where}: field {field!r}[{i}] needs a known role/from and text content/value, "
                              f"got {str(t)[:60]}", f"field {field!r} has a bad turn")
        out.append({"role": _ROLES[speaker], "content": content})
    return out


def to_conversation(record: dict, fmt: str, where: str) -> list[dict]:
    if fmt == "alpaca":
        from jaxllm.data.templates import alpaca_user
        instruction = _text(record, "instruction", where)
        output = _text(record, "output", where)
        return [{"role": "user", "content": alpaca_user(instruction, _text(record, "input", where, optional=True))},
                {"role": "assistant", "content": output}]
    if fmt == "sharegpt":
        conv = _turns(_require(record, "conversations", where), where, "conversations")
    elif fmt == "messages":
        conv = _turns(_require(record, "messages", where), where, "messages")
    else:
        raise RecordError(f"{where}: a {fmt!r} record is not instruction data (expected one of {SFT_FORMATS})")
    system = _text(record, "system", where, optional=True)
    if system and (not conv or conv[0]["role"] != "system"):
        conv.insert(0, {"role": "system", "content": system})
    return conv


def _response_text(value, where: str, field: str) -> str:
    """chosen/rejected given as text, as one {from, value} turn, or as a message list (last assistant turn)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _turns([value], where, field)[0]["content"]
    if isinstance(value, list) and value:
        return _turns(value, where, field)[-1]["content"]
    raise RecordError(f"{where}: field {field!r} must be text, a turn or a list of turns, got "
                      f"{type(value).__name__} {str(value)[:40]}", f"field {field!r} is not text")


def to_pair(record: dict, where: str) -> dict:
    chosen_field = "chosen" if "chosen" in record else "selected"
    chosen = _require(record, chosen_field, where)
    rejected = _require(record, "rejected", where)
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _turns(prompt, where, "prompt")
    elif "conversations" in record:
        prompt = _turns(record["conversations"], where, "conversations")
    elif "messages" in record:
        prompt = _turns(record["messages"], where, "messages")
    elif isinstance(chosen, list) and len(chosen) > 1:   # full conversations: the shared prefix is the prompt
        prompt = _turns(chosen[:-1], where, chosen_field)
    else:
        raise RecordError(f"{where}: field 'prompt' missing (nor conversations/messages)", "field 'prompt' missing")
    system = _text(record, "system", where, optional=True)
    if system:
        prompt = [{"role": "system", "content": system}] + prompt
    margin = record.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise RecordError(f"{where}: field 'margin' must be a number, got {margin!r}", "field 'margin' is not a number")
    return {"prompt": prompt, "chosen": _response_text(chosen, where, chosen_field),
            "rejected": _response_text(rejected, where, "rejected"), "margin": float(margin)}


def load_sft(paths, fmt: str = "auto", on_error: str = "raise") -> list[list[dict]]:
    """Conversations from instruction files. on_error: "raise" (file:line:field) or "skip" (counted per reason
    and logged). Records without an answer are skipped and counted; no conversation left is an error naming
    every cause."""
    out, skipped = [], {}
    for path in _paths(paths):
        for where, record, kind in _records(path, fmt, on_error, skipped):
            if kind not in SFT_FORMATS:
                raise ValueError(f"{path}: this is {kind!r} data (preference pairs), not instruction data "
                                 f"(expected one of {SFT_FORMATS}); use configs/reward.py or configs/dpo.py")
            conv = _converted(to_conversation, (record, kind, where), on_error, skipped)
            if conv is None:
                continue
            if not any(t["role"] == "assistant" and t["content"].strip() for t in conv):
                count(skipped, "no assistant answer (empty response)", where)
                continue
            out.append(conv)
    return _kept(paths, "instruction record", out, skipped)


def to_prompt(record: dict, where: str) -> dict:
    """An RL prompt record -> {"messages": the conversation up to the assistant's turn, "fields": the record's
    other scalar fields (e.g. a reference `answer` that a rule reward reads)}. Layouts: {"prompt": text or
    turns}, Alpaca's instruction (+ input; an output is ignored), or messages / conversations (turns after the
    last user turn are dropped)."""
    if "prompt" in record:
        value = record["prompt"]
        messages = ([{"role": "user", "content": value}] if isinstance(value, str)
                    else _turns(value, where, "prompt"))
        used = {"prompt"}
    else:
        try:
            fmt = detect_format(record)
        except ValueError as e:
            raise RecordError(f"{where}: {e}", "unrecognised layout") from None
        if fmt not in SFT_FORMATS:
            raise RecordError(f"{where}: a {fmt!r} record is not a prompt (expected 'prompt', Alpaca or messages)",
                              "not a prompt record")
        if fmt == "alpaca":
            from jaxllm.data.templates import alpaca_user
            messages = [{"role": "user", "content": alpaca_user(_text(record, "instruction", where),
                                                                _text(record, "input", where, optional=True))}]
        else:
            messages = _turns(record["messages" if fmt == "messages" else "conversations"], where, fmt)
        used = {"instruction", "input", "output", "messages", "conversations"}
    last_user = max((i for i, t in enumerate(messages) if t["role"] == "user"), default=-1)
    if last_user < 0 or not messages[last_user]["content"].strip():
        raise RecordError(f"{where}: the prompt has no user turn with text", "no user text")
    fields = {k: v for k, v in record.items() if k not in used and isinstance(v, (str, int, float, bool))}
    return {"messages": messages[:last_user + 1], "fields": fields}


def load_prompts(paths, on_error: str = "raise") -> list[dict]:
    """RL prompts (`to_prompt`) from JSON / JSON Lines files; malformed records name file:line and field, or
    with on_error="skip" are counted and logged."""
    out, skipped = [], {}
    for path in _paths(paths):
        for lineno, record in read_json_records(path):
            where = f"{path}:{lineno}"
            if not isinstance(record, dict):
                error = RecordError(f"{where}: a record must be a JSON object", "not a JSON object")
                if on_error == "raise":
                    raise error
                count(skipped, error.reason, where)
                continue
            prompt = _converted(to_prompt, (record, where), on_error, skipped)
            if prompt is not None:
                out.append(prompt)
    return _kept(paths, "prompt record", out, skipped)


def load_pairs(paths, on_error: str = "raise") -> list[dict]:
    """Preference pairs; chosen == rejected and empty responses are skipped and counted (as malformed records
    are with on_error="skip"); no pair left is an error naming every cause with its count."""
    out, skipped = [], {}
    for path in _paths(paths):
        for where, record, kind in _records(path, "auto", on_error, skipped):
            if kind not in PAIR_FORMATS:
                raise ValueError(f"{path}: this is {kind!r} data, not preference pairs (need chosen/rejected)")
            pair = _converted(to_pair, (record, where), on_error, skipped)
            if pair is None:
                continue
            empty = [side for side in ("chosen", "rejected") if not pair[side].strip()]
            if empty:
                count(skipped, f"empty {' and '.join(empty)}", where)
            elif pair["chosen"] == pair["rejected"]:
                count(skipped, "chosen identical to rejected", where)
            else:
                out.append(pair)
    return _kept(paths, "preference pair", out, skipped)


def _paths(paths) -> list:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def _converted(convert, args, on_error: str, skipped: dict):
    """convert(*args), or None for a malformed record when skipping (counted under its reason)."""
    try:
        return convert(*args)
    except RecordError as e:
        if on_error == "raise":
            raise
        count(skipped, e.reason, args[-1])
        return None


def _records(path, fmt: str, on_error: str, skipped: dict):
    """(where, record, layout) of each record that is a JSON object of a known layout; the others raise, or
    with on_error="skip" are counted."""
    kind = None if fmt == "auto" else fmt
    on_bad_line = None if on_error == "raise" else lambda e, lineno: count(skipped, e.reason, f"{path}:{lineno}")
    for lineno, record in read_json_records(path, on_bad_line=on_bad_line):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            error = RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}",
                                "not a JSON object")
        elif kind is None:
            try:
                kind = detect_format(record)
            except ValueError as e:
                error = RecordError(f"{where}: {e}", "unrecognised layout")
            else:
                error = None
        else:
            error = None
        if error is not None:
            if on_error == "raise":
                raise error
            count(skipped, error.reason, where)
            continue
        yield where, record, kind


def count(skipped: dict, reason: str, where: str) -> None:
    """Counts one skipped record under `reason`, remembering where the first one was."""
    n, first = skipped.get(reason, (0, where))
    skipped[reason] = (n + 1, first)


def describe_skipped(skipped: dict) -> str:
    """"2 field 'output' is not text (first at f.jsonl:3), 1 chosen identical to rejected (...)"."""
    return ", ".join(f"{n} {reason} (first at {first})" for reason, (n, first) in skipped.items()) or "none"


def _kept(paths, what: str, out: list, skipped: dict) -> list:
    names = ", ".join(map(str, _paths(paths)))
    if not out:
        raise ValueError(f"no {what} left in {names}: skipped {describe_skipped(skipped)}")
    log = logging.warning if skipped else logging.info
    log("%ss from %s: %d kept; skipped: %s", what, names, len(out), describe_skipped(skipped))
    return out
