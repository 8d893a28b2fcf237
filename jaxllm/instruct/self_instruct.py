"""Self-instruct: a teacher model behind an OpenAI-compatible endpoint writes new instruction data.

Each request samples k seed tasks into the generation prompt of Stanford Alpaca (English, prompt.txt) or
BELLE (Chinese, prompt_cn.txt), numbered "###\\n1. Instruction: ...\\n1. Input:\\n...\\n1. Output:\\n..."
(BELLE: 指令 / 输入 / 输出), and ends with the next number's open instruction, which the teacher continues.
The reply is split into numbered blocks; each block becomes an Alpaca record {instruction, input, output}
unless a filter drops it:
  malformed   the block lacks the three numbered fields in order
  truncated   the last block of a reply cut off by the length limit
  length      instruction of <= 3 or > 150 words (English), < 4 or > 300 characters (Chinese)
  banned      mentions what a text model cannot do (image, picture, graph, 图片, 视频, ...)
  format      starts with punctuation, or "Write a program"
  empty       empty output
  duplicate   ROUGE-L F >= 0.7 against any seed task or any instruction kept so far (on words for English,
              on characters for Chinese, where words are not space-separated)
A request the teacher refuses (HTTP 4xx, or failing after the client's retries) counts as teacher_error;
five in a row stop the run.
Records are appended to the output JSONL as they are kept; a state file beside it holds the request count
and drop counts, so a rerun resumes where the last one stopped (each request's seed-task sample is a
function of (seed, request index)).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Sequence

from jaxllm.data.formats import read_json_records
from jaxllm.eval.client import ClientError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Language:
    name: str
    labels: tuple[str, str, str]          # instruction, input, output as written in the prompt
    no_input: str                         # what stands for an empty input
    banned: tuple[str, ...]
    min_len: int                          # instruction length bounds, in words (en) or characters (zh)
    max_len: int


LANGUAGES = {
    "en": Language("en", ("Instruction", "Input", "Output"), "<noinput>",
                   ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"), 4, 150),
    "zh": Language("zh", ("指令", "输入", "输出"), "<无输入>",
                   ("图片", "图像", "照片", "图表", "流程图", "视频", "音频", "音乐", "链接", "绘制", "画图"), 4, 300),
}
_LABELS = "|".join(sorted({lab for lang in LANGUAGES.values() for lab in lang.labels}, key=len, reverse=True))
_FIELD = re.compile(rf"(\d+)\s*[.．、]\s*({_LABELS})\s*[:：]", re.IGNORECASE)


def is_chinese(text: str) -> bool:
    return sum("\u4e00" <= ch <= "\u9fff" for ch in text) > len(text) * 0.1


# ----------------------------------------------------------------------------------------------------
# Inputs.

def load_seed_tasks(path: str | Path) -> list[dict]:
    """Alpaca / BELLE seed tasks (JSON Lines: instruction, instances[0].{input, output}) -> flat records."""
    path = Path(path)
    out = []
    for lineno, r in read_json_records(path):
        try:
            instance = r["instances"][0]
            out.append({"instruction": r["instruction"], "input": instance.get("input", ""),
                        "output": instance["output"]})
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: missing field {e} (need instruction and "
                             f"instances[0].output)") from None
    if not out:
        raise ValueError(f"{path}: no seed tasks")
    return out


def load_prompt(path: str | Path) -> str:
    """The generation prompt. BELLE's prompt_cn.txt is one line with literal '\\n' escapes: unescape them."""
    text = Path(path).read_text(encoding="utf-8-sig")
    if "\n" not in text.strip() and "\\n" in text:
        text = text.replace("\\n", "\n")
    return text.rstrip("\n")


def encode_prompt(base: str, tasks: Sequence[dict], lang: Language) -> str:
    """The prompt, the k numbered example tasks, and the open next instruction."""
    ins, inp, outp = lang.labels
    parts = [base + "\n"]
    for i, t in enumerate(tasks, 1):
        instruction = re.sub(r"\s+", " ", t["instruction"]).strip().rstrip(":：")
        parts.append(f"###\n{i}. {ins}: {instruction}\n{i}. {inp}:\n{t['input'] or lang.no_input}\n"
                     f"{i}. {outp}:\n{t['output']}\n")
    parts.append(f"###\n{len(tasks) + 1}. {ins}:")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------
# Parsing and filtering.

def parse_response(text: str, first_number: int, lang: Language, finish_reason: str | None = None
                   ) -> tuple[list[dict], Counter]:
    """Records from a teacher reply that continues the open "{first_number}. Instruction:" line."""
    drops = Counter()
    text = f"{first_number}. {lang.labels[0]}:" + text
    blocks = [b for b in text.split("###") if b.strip()]
    records = []
    for i, block in enumerate(blocks):
        if i == len(blocks) - 1 and finish_reason == "length":
            drops["truncated"] += 1
            continue
        pieces = _FIELD.split(block)        # [before, num, label, text, num, label, text, ...]
        fields = [(pieces[j + 1].lower(), pieces[j + 2].strip()) for j in range(1, len(pieces) - 2, 3)]
        kinds = [_kind(label) for label, _ in fields]
        if kinds != ["instruction", "input", "output"]:
            drops["malformed"] += 1
            continue
        instruction, input_text, output = (value for _, value in fields)
        if input_text.strip().lower() in (lang.no_input.lower(), "<noinput>", "<无输入>", "无输入", "none", ""):
            input_text = ""
        records.append({"instruction": instruction, "input": input_text, "output": output})
    return records, drops


def _kind(label: str) -> str:
    for lang in LANGUAGES.values():
        for kind, name in zip(("instruction", "input", "output"), lang.labels):
            if label == name.lower():
                return kind
    return "?"


_PUNCTUATION = set(string.punctuation) | set("，。！？；：、“”‘’（）《》【】…—")


def rouge_tokens(text: str, lang: Language) -> list[str]:
    """Words (lower-cased alphanumerics) for English; characters (no spaces or punctuation) for Chinese."""
    if lang.name == "zh":
        return [ch for ch in text if not ch.isspace() and ch not in _PUNCTUATION]
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence, O(len(a)·len(b)) time and O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 = 2·LCS / (|a| + |b|) (precision and recall of the LCS, equally weighted)."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


class DuplicateIndex:
    """Instructions kept so far; `max_similarity` prunes with a bag-of-tokens bound before running the LCS."""

    def __init__(self, lang: Language):
        self.lang, self.items = lang, []

    def add(self, text: str) -> None:
        toks = rouge_tokens(text, self.lang)
        self.items.append((toks, Counter(toks)))

    def is_duplicate(self, text: str, threshold: float = 0.7) -> bool:
        toks = rouge_tokens(text, self.lang)
        bag = Counter(toks)
        for other, other_bag in self.items:
            total = len(toks) + len(other)
            if total == 0 or 2 * sum((bag & other_bag).values()) / total < threshold:
                continue            # LCS <= multiset overlap, so ROUGE-L cannot reach the threshold
            if rouge_l(toks, other) >= threshold:
                return True
        return False


def filter_reason(record: dict, lang: Language, index: DuplicateIndex) -> str | None:
    """Why a record is dropped, or None to keep it."""
    ins = record["instruction"]
    size = len(ins.split()) if lang.name == "en" else len(rouge_tokens(ins, lang))
    if not lang.min_len <= size <= lang.max_len:
        return "length"
    low = ins.lower()
    if any(re.search(rf"\b{re.escape(w)}\b", low) if lang.name == "en" else w in ins for w in lang.banned):
        return "banned"
    if ins[0] in _PUNCTUATION or ins.startswith("Write a program") or (lang.name == "en" and not ins[0].isascii()):
        return "format"
    if not record["output"].strip():
        return "empty"
    if index.is_duplicate(ins):
        return "duplicate"
    return None


# ----------------------------------------------------------------------------------------------------
# The loop.

def generate_instructions(seed_tasks: list[dict], base_prompt: str, client, out_path: str | Path, *, num: int,
                          lang: str | None = None, k: int = 3, seed: int = 0, max_requests: int | None = None,
                          temperature: float = 1.0, max_tokens: int = 3072) -> dict:
    """Asks the teacher until `num` records are kept (or max_requests is reached); returns the stats.

    client: anything with `complete(messages, temperature=, max_tokens=, **extra) -> (text, finish_reason)`,
    such as jaxllm.eval.client.ChatClient."""
    language = LANGUAGES[lang or ("zh" if is_chinese(base_prompt) else "en")]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_name(out.name + ".state.json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {"requests": 0, "dropped": {}}
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if out.exists() else []
    index = DuplicateIndex(language)
    for t in seed_tasks + kept:
        index.add(t["instruction"])
    dropped = Counter(state["dropped"])
    max_requests = max_requests if max_requests is not None else 10 * num
    if kept:
        log.info("resuming: %d records kept after %d requests", len(kept), state["requests"])
    consecutive_errors = requests_now = errors_now = 0
    last_error = None
    with out.open("a", encoding="utf-8") as f:
        while len(kept) < num and state["requests"] < max_requests:
            rng = random.Random(seed * 1_000_003 + state["requests"])
            tasks = rng.sample(seed_tasks, min(k, len(seed_tasks)))
            prompt = encode_prompt(base_prompt, tasks, language)
            requests_now += 1
            try:
                text, finish = client.complete([{"role": "user", "content": prompt}], temperature=temperature,
                                               max_tokens=max_tokens, top_p=1.0)
                consecutive_errors = 0
            except ClientError as e:
                # One refused request (say, a prompt over the teacher's context) is counted and the next one,
                # with other seed tasks, tried; a teacher that keeps failing stops the run.
                consecutive_errors += 1
                errors_now += 1
                last_error = e
                if consecutive_errors >= 5:
                    raise ClientError(f"teacher failed 5 requests in a row; last: {e}", e.status) from None
                log.warning("request %d: %s", state["requests"], e)
                text, finish = "", None
                dropped["teacher_error"] += 1
            records, drops = parse_response(text, len(tasks) + 1, language, finish) if text else ([], Counter())
            if text and not records and not drops:
                drops["unparseable"] += 1
            dropped.update(drops)
            for r in records:
                reason = filter_reason(r, language, index)
                if reason:
                    dropped[reason] += 1
                    continue
                if len(kept) >= num:
                    break
                index.add(r["instruction"])
                kept.append(r)
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            state = {"requests": state["requests"] + 1, "dropped": dict(dropped)}
            state_path.write_text(json.dumps(state))
    if requests_now and errors_now == requests_now:   # fewer than five, all failed: not a result to report
        raise ClientError(f"all {requests_now} requests to the teacher failed; last: {last_error}", last_error.status)
    stats = {"kept": len(kept), "requests": state["requests"], "dropped": dict(dropped), "language": language.name,
             "out": str(out)}
    log.info("self-instruct: %s", stats)
    return stats
