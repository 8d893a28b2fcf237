"""k-shot multiple-choice accuracy on C-Eval, CMMLU and MMLU CSV files.

Layouts (all four options A-D), told apart by their first row:
  C-Eval  <dir>/{dev,val,test}/<subject>_<split>.csv  header id,question,A,B,C,D,answer[,explanation]
  CMMLU   <dir>/{dev,test}/<subject>.csv              header ,Question,A,B,C,D,Answer (unnamed index first)
  MMLU    <dir>/{dev,val,test}/<subject>_<split>.csv  no header: question,A,B,C,D,answer
`<dir>/subject_mapping.json` (subject -> {"name", "category"}, or C-Eval's [english, chinese, category]) gives
each subject's display name and category.

Prompts follow C-Eval's official evaluator byte for byte (the Chinese styles) or Hendrycks' MMLU script
(the English style): a header naming the subject, k solved questions from the dev split, then the question
ending in the answer prefix. The prediction is the argmax over the next-token logits of the option letters
(what a softmax over them would pick). `evaluate_questions` takes questions built in memory, with 2 to 4
options each. The letter ids are those the tokenizer produces right after
the answer prefix, not of the letter alone: for SentencePiece models "答案：C" ends in the piece "C" while
"C" alone encodes to "▁C", a different token.

Shots that make a prompt longer than the model's context are dropped from the last one back and counted; a
question too long even with no shots is cut from the left (keeping the options and answer prefix) and
counted.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.model.padding import pad_sequences, round_up
from jaxllm.model.transformer import hidden_states, logits_from_hidden

log = logging.getLogger(__name__)
LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    options: tuple[str, ...]   # 2 to 4 options, lettered A, B, ... (the CSV layouts always have 4)
    answer: str           # "A".."D"
    where: str            # "file:line", for error messages and the predictions file


@dataclasses.dataclass(frozen=True)
class PromptStyle:
    header: str           # formatted with {subject}
    option: str           # one option line, formatted with {letter} and {text}; follows the question
    answer_prefix: str    # the prompt ends with this
    answer: str           # formatted with {letter}: what a shot's answer looks like after the prefix
    shot_end: str         # after a shot's answer


STYLES = {
    # C-Eval's official evaluator (code/evaluator_series/evaluators/llama.py, format_example).
    "ceval": PromptStyle("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
                         "\n{letter}. {text}", "\n答案：", "{letter}", "\n\n"),
    # Hendrycks et al.'s MMLU evaluation script (format_example / gen_prompt).
    "mmlu": PromptStyle("The following are multiple choice questions (with answers) about {subject}.\n\n",
                        "\n{letter}. {text}", "\nAnswer:", " {letter}", "\n\n"),
}


# ----------------------------------------------------------------------------------------------------
# Reading the CSV layouts.

def read_csv(path: str | Path, subject: str | None = None) -> tuple[list[Question], Counter]:
    """Questions of one CSV file in any of the three layouts, and counts of rows skipped (no answer)."""
    path = Path(path)
    subject = subject or subject_of(path)
    questions, skipped = [], Counter()
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        rows = []
        line = 1
        for row in reader:
            rows.append((line, row))
            line = reader.line_num + 1          # a quoted field may span lines: remember where a row starts
    if not rows:
        return [], skipped
    first = [c.strip().lower() for c in rows[0][1]]
    if {"question", "a", "b", "c", "d", "answer"} <= set(first):
        col = {name: first.index(name) for name in ("question", "a", "b", "c", "d", "answer")}
        id_col = first.index("id") if "id" in first else 0 if first[0] == "" else None
        body = rows[1:]
    else:   # MMLU: no header, six positional columns
        col = {"question": 0, "a": 1, "b": 2, "c": 3, "d": 4, "answer": 5}
        id_col, body = None, rows
    width = max(col.values()) + 1
    for n, (line, row) in enumerate(body):
        where = f"{path}:{line}"
        if len(row) < width:
            raise ValueError(f"{where}: {len(row)} columns, expected at least {width} "
                             f"(question, A, B, C, D, answer)")
        answer = row[col["answer"]].strip()
        if not answer:
            skipped["no answer"] += 1
            continue
        if answer not in LETTERS:
            raise ValueError(f"{where}: field 'answer' is {answer!r}, expected one of {', '.join(LETTERS)}")
        qid = row[id_col].strip() if id_col is not None else str(n)
        options = tuple(row[col[k]] for k in ("a", "b", "c", "d"))
        questions.append(Question(subject, qid, row[col["question"]], options, answer, where))
    if skipped:
        log.info("%s: skipped %s", path, dict(skipped))
    return questions, skipped


def subject_of(path: Path) -> str:
    """'accountant' from accountant_val.csv (C-Eval, MMLU) or accountant.csv (CMMLU)."""
    stem = path.stem
    for split in ("_dev", "_val", "_test"):
        if stem.endswith(split):
            return stem[: -len(split)]
    return stem


def load_split(data_dir: str | Path, split: str, subjects: Sequence[str] | None = None
               ) -> tuple[dict[str, list[Question]], Counter]:
    """subject -> questions of <data_dir>/<split>/*.csv, and the skip counts summed over files."""
    directory = Path(data_dir) / split
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no {split!r} split here (expected <data>/{split}/*.csv)")
    out, skipped = {}, Counter()
    for path in sorted(directory.glob("*.csv")):
        subject = subject_of(path)
        if subjects and subject not in subjects:
            continue
        out[subject], s = read_csv(path, subject)
        skipped += s
    if not out:
        raise FileNotFoundError(f"{directory}: no CSV files" + (f" for subjects {list(subjects)}" if subjects else ""))
    return out, skipped


def load_mapping(data_dir: str | Path) -> dict[str, dict]:
    """subject -> {"name", "category"} from <data_dir>/subject_mapping.json (empty when absent)."""
    path = Path(data_dir) / "subject_mapping.json"
    if not path.exists():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for subject, v in raw.items():
        if isinstance(v, dict) and {"name", "category"} <= v.keys():
            out[subject] = {"name": v["name"], "category": v["category"]}
        elif isinstance(v, list) and len(v) == 3:           # C-Eval's own [english, chinese, category]
            out[subject] = {"name": v[1], "category": v[2]}
        else:
            raise ValueError(f"{path}: entry {subject!r} is neither {{name, category}} nor "
                             f"[english, chinese, category]")
    return out


# ----------------------------------------------------------------------------------------------------
# Prompts.

def format_question(q: Question, style: PromptStyle, with_answer: bool) -> str:
    text = q.question + "".join(style.option.format(letter=l, text=t) for l, t in zip(LETTERS, q.options))
    text += style.answer_prefix
    if with_answer:
        text += style.answer.format(letter=q.answer) + style.shot_end
    return text


def build_prompt(subject_name: str, shots: Sequence[Question], q: Question, style: PromptStyle) -> str:
    return (style.header.format(subject=subject_name) + "".join(format_question(s, style, True) for s in shots)
            + format_question(q, style, False))


def option_token_ids(tokenizer, style: PromptStyle) -> list[int]:
    """The token each letter becomes right after the answer prefix (see the module docstring)."""
    prefix = tokenizer.encode(style.answer_prefix)
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(style.answer_prefix + style.answer.format(letter=letter))
        common = 0
        while common < min(len(prefix), len(full)) and prefix[common] == full[common]:
            common += 1
        rest = full[common:]
        if common < len(prefix) or not rest or letter not in tokenizer.decode(rest[:1]):
            raise ValueError(f"{tokenizer.path}: cannot find one token for option {letter!r} after "
                             f"{style.answer_prefix!r} (pieces {[tokenizer.id_to_piece(i) for i in rest]})")
        ids.append(rest[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{tokenizer.path}: option letters share a token: {ids}")
    return ids


def fit_prompt(tokenizer, subject_name: str, shots: Sequence[Question], q: Question, style: PromptStyle,
               max_len: int) -> tuple[list[int], int, bool]:
    """(token ids with bos, shots kept, truncated): drops shots from the end until the prompt fits."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    for k in range(len(shots), -1, -1):
        ids = bos + tokenizer.encode(build_prompt(subject_name, shots[:k], q, style))
        if len(ids) <= max_len:
            return ids, k, False
    return bos + ids[len(ids) - max_len + len(bos):], 0, True


# ----------------------------------------------------------------------------------------------------
# Scoring.

@functools.partial(jax.jit, static_argnames=("cfg",))
def _option_logits(params, tokens, segment_ids, positions, lengths, option_ids, cfg):
    """tokens, segment_ids, positions: (batch, length) right-padded; lengths (batch,). Returns (batch, 4)
    logits."""
    h = hidden_states(params, tokens, cfg, segment_ids=segment_ids, positions=positions)   # (batch, length, embed)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)     # (batch, 1, embed)
    logits = logits_from_hidden(params, last, cfg)[:, 0]                     # (batch, vocab)
    return logits[:, option_ids]                                             # (batch, 4)


def score_prompts(params, cfg: ModelConfig, prompts: Sequence[list[int]], option_ids: Sequence[int],
                  batch_size: int = 8) -> np.ndarray:
    """(n, 4) option logits. Prompts are sorted by length and batched with right padding; lengths are
    rounded up to multiples of 64 and batches filled with dummy rows, so few programs compile."""
    order = np.argsort([len(p) for p in prompts], kind="stable")
    out = np.zeros((len(prompts), len(option_ids)), np.float32)
    option_ids = jnp.asarray(option_ids, jnp.int32)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        rows = [prompts[i] for i in idx]
        length = min(round_up(max(len(p) for p in rows), 64), cfg.max_seq_len)
        tokens, seg, pos = pad_sequences(rows, length, batch=batch_size)
        lengths = np.ones((batch_size,), np.int32)                # dummy rows read their (padding) first slot
        lengths[:len(rows)] = [len(p) for p in rows]
        logits = _option_logits(params, tokens, seg, pos, lengths, option_ids, cfg=cfg)
        out[idx] = np.asarray(logits)[:len(idx)]
    return out


def _accuracy(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}


def evaluate_mcq(params, cfg: ModelConfig, tokenizer, data_dir: str | Path, *, shots: int = 5,
                 split: str | None = None, style: str | None = None, subjects: Sequence[str] | None = None,
                 batch_size: int = 8, max_len: int | None = None) -> dict:
    """Accuracy on a C-Eval / CMMLU / MMLU directory: loads it, then `evaluate_questions`.

    split: the scored split; default val, else test, else dev (then a question is never its own shot).
    style: "ceval" or "mmlu"; default mmlu when the mapping's names are ASCII, else ceval."""
    data_dir = Path(data_dir)
    if split is None:
        split = next((s for s in ("val", "test", "dev") if (data_dir / s).is_dir()), "val")
    questions, skipped = load_split(data_dir, split, subjects)
    dev = load_split(data_dir, "dev", list(questions))[0] if shots > 0 and (data_dir / "dev").is_dir() else {}
    mapping = load_mapping(data_dir)
    if style is None:
        names = [m["name"] for m in mapping.values()] or list(questions)
        style = "mmlu" if all(n.isascii() for n in names) else "ceval"
    report = evaluate_questions(params, cfg, tokenizer, questions, dev, shots=shots, mapping=mapping, style=style,
                                batch_size=batch_size, max_len=max_len)
    return {"data": str(data_dir), "split": split, **report, "skipped": dict(skipped)}


def evaluate_questions(params, cfg: ModelConfig, tokenizer, questions: dict[str, list[Question]],
                       shot_pool: dict[str, list[Question]] | None = None, *, shots: int = 5,
                       mapping: dict[str, dict] | None = None, style: str = "ceval", batch_size: int = 8,
                       max_len: int | None = None) -> dict:
    """Accuracy per subject, per category and overall (micro over questions; macro over subjects too).

    questions / shot_pool: subject -> questions (in memory; see `Question`). The first `shots` of a subject's
    pool, minus the question itself, are its shots. mapping: subject -> {"name", "category"}."""
    shot_pool, mapping = shot_pool or {}, mapping or {}
    prompt_style = STYLES[style]
    option_ids = option_token_ids(tokenizer, prompt_style)
    max_len = max_len or cfg.max_seq_len

    t0 = time.perf_counter()
    flat, prompts, dropped, truncated = [], [], 0, 0
    for subject, qs in questions.items():
        name = mapping.get(subject, {}).get("name", subject.replace("_", " "))
        for q in qs:
            if not 2 <= len(q.options) <= len(LETTERS) or q.answer not in LETTERS[:len(q.options)]:
                raise ValueError(f"{q.where}: {len(q.options)} options with answer {q.answer!r}; expected 2 to "
                                 f"{len(LETTERS)} options and a letter among them")
            # A question is never its own shot (when the scored split is also the shot split).
            pool = [s for s in shot_pool.get(subject, []) if s is not q and not (s.where and s.where == q.where)]
            pool = pool[:shots]
            ids, kept, cut = fit_prompt(tokenizer, name, pool, q, prompt_style, max_len)
            dropped += len(pool) - kept
            truncated += cut
            flat.append(q)
            prompts.append(ids)
    logits = score_prompts(params, cfg, prompts, option_ids, batch_size)
    elapsed = time.perf_counter() - t0
    if dropped or truncated:
        log.info("%d shots dropped and %d questions cut to fit %d tokens", dropped, truncated, max_len)

    per_subject, per_category = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    predictions = []
    for q, row in zip(flat, logits):
        row = row[:len(q.options)]                 # a question with fewer options ignores the other letters
        pred = LETTERS[int(np.argmax(row))]
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        ok = pred == q.answer
        category = mapping.get(q.subject, {}).get("category", "Other")
        for table, key in ((per_subject, q.subject), (per_category, category)):
            table[key][0] += ok
            table[key][1] += 1
        predictions.append({"subject": q.subject, "id": q.id, "answer": q.answer, "prediction": pred,
                            "probs": [round(float(p), 6) for p in probs], "where": q.where})
    subjects_out = {s: {"name": mapping.get(s, {}).get("name", s), "category": mapping.get(s, {}).get("category",
                    "Other"), **_accuracy(*per_subject[s])} for s in questions if per_subject[s][1]}
    correct = sum(v[0] for v in per_subject.values())
    return {
        "style": style, "shots": shots,
        "overall": _accuracy(correct, len(flat)),
        "macro_accuracy": float(np.mean([v["accuracy"] for v in subjects_out.values()])) if subjects_out else 0.0,
        "categories": {c: _accuracy(*v) for c, v in sorted(per_category.items())},
        "subjects": subjects_out,
        "shots_dropped": dropped, "questions_truncated": truncated,
        "questions_per_s": len(flat) / elapsed if elapsed > 0 else 0.0,
        "predictions": predictions,
    }


def format_table(report: dict) -> str:
    lines = [f"{'subject':<44} {'category':<16} {'n':>5} {'acc':>7}", "-" * 75]
    for s, v in report["subjects"].items():
        lines.append(f"{s[:44]:<44} {v['category'][:16]:<16} {v['total']:>5} {100 * v['accuracy']:>6.2f}%")
    lines.append("-" * 75)
    for c, v in report["categories"].items():
        lines.append(f"{'[' + c + ']':<44} {'':<16} {v['total']:>5} {100 * v['accuracy']:>6.2f}%")
    o = report["overall"]
    lines.append(f"{'overall':<44} {'':<16} {o['total']:>5} {100 * o['accuracy']:>6.2f}%   "
                 f"(macro {100 * report['macro_accuracy']:.2f}%, {report['shots']}-shot, "
                 f"{report['shots_dropped']} shots dropped, {report['questions_truncated']} cut)")
    return "\n".join(lines)
