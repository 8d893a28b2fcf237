"""k-shot multiple-choice accuracy on C-Eval, CMMLU and MMLU CSV files (read by mcq_data.py), and
predictions in C-Eval's submission format for splits whose answers are hidden.

Prompts follow C-Eval's official evaluator byte for byte (the Chinese styles) or Hendrycks' MMLU script
(the English style): a header naming the subject, k solved questions from the dev split, then the question
ending in the answer prefix. The prompt language follows the questions' own language (not the subject
names, which are English file names without a subject_mapping.json) and is stated in the report. The
prediction is the argmax over the next-token logits of the option letters
(what a softmax over them would pick). `evaluate_questions` takes questions built in memory, with 2 to 4
options each. The letter ids are those the tokenizer produces right after
the answer prefix, not of the letter alone: for SentencePiece models "答案：C" ends in the piece "C" while
"C" alone encodes to "▁C", a different token.

k shots need a dev split holding every scored subject: without one it is an error (pass shots=0 for a
zero-shot score), never a zero-shot score labelled k-shot. A subject with fewer than k dev questions (other
than the question itself) gets what it has, and such questions are counted. Shots that make a prompt longer
than the model's context are dropped from the last one back and counted; a question too long even with no
shots is cut from the left (keeping the options and answer prefix) and counted.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.eval.mcq_data import (LETTERS, Question, is_chinese, load_mapping, load_split,  # noqa: F401 (re-exported)
                                  read_csv, subject_of)
from jaxllm.progress import ProgressLog
from jaxllm.model.padding import pad_sequences, round_up
from jaxllm.model.transformer import hidden_states, logits_from_hidden

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptStyle:
    header: str           # formatted with {subject}
    option: str           # one option line, formatted with {letter} and {text}; follows the question
    answer_prefix: str    # the prompt ends with this
    answer: str           # formatted with {letter}: what a shot's answer looks like after the prefix
    shot_end: str         # after a shot's answer
    language: str         # the prompt's language, stated in the report: "zh" or "en"


STYLES = {
    # C-Eval's official evaluator (code/evaluator_series/evaluators/llama.py, format_example).
    "ceval": PromptStyle("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
                         "\n{letter}. {text}", "\n答案：", "{letter}", "\n\n", "zh"),
    # Hendrycks et al.'s MMLU evaluation script (format_example / gen_prompt).
    "mmlu": PromptStyle("The following are multiple choice questions (with answers) about {subject}.\n\n",
                        "\n{letter}. {text}", "\nAnswer:", " {letter}", "\n\n", "en"),
}


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
    progress = ProgressLog("multiple choice", len(prompts), "questions", logger=log)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        rows = [prompts[i] for i in idx]
        length = min(round_up(max(len(p) for p in rows), 64), cfg.max_seq_len)
        tokens, seg, pos = pad_sequences(rows, length, batch=batch_size)
        lengths = np.ones((batch_size,), np.int32)                # dummy rows read their (padding) first slot
        lengths[:len(rows)] = [len(p) for p in rows]
        logits = _option_logits(params, tokens, seg, pos, lengths, option_ids, cfg=cfg)
        out[idx] = np.asarray(logits)[:len(idx)]
        progress.update(b + len(idx))
    progress.finish()
    return out


def _accuracy(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}


def load_shot_pool(data_dir: Path, subjects: Sequence[str], shots: int) -> dict[str, list[Question]]:
    """subject -> dev questions for k-shot prompts; an error when k > 0 and the dev split or a subject in it
    is missing (a zero-shot run must be asked for, never labelled k-shot)."""
    if shots == 0:
        return {}
    dev_dir = data_dir / "dev"
    if not dev_dir.is_dir():
        raise FileNotFoundError(f"{dev_dir}: no dev split to draw {shots}-shot examples from; add it, or pass "
                                f"--shots=0 to score zero-shot")
    dev, _ = load_split(data_dir, "dev", subjects)
    missing = [s for s in subjects if not dev.get(s)]
    if missing:
        raise ValueError(f"{dev_dir}: no solved questions for {len(missing)} of {len(subjects)} subjects "
                         f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}), so they cannot be "
                         f"scored {shots}-shot; add them, score --subjects without them, or pass --shots=0")
    return dev


def evaluate_mcq(params, cfg: ModelConfig, tokenizer, data_dir: str | Path, *, shots: int = 5,
                 split: str | None = None, style: str | None = None, subjects: Sequence[str] | None = None,
                 batch_size: int = 8, max_len: int | None = None, predict_only: bool = False) -> dict:
    """Accuracy on a C-Eval / CMMLU / MMLU directory: loads it, then `evaluate_questions`. With
    predict_only, answers are neither needed nor scored: the report's "submission" holds C-Eval's
    submission format, subject -> question id -> letter.

    split: the scored split; default val, else test, else dev (then a question is never its own shot).
    style: "ceval" or "mmlu"; default by the questions' language (Chinese -> ceval)."""
    data_dir = Path(data_dir)
    if split is None:
        split = next((s for s in ("val", "test", "dev") if (data_dir / s).is_dir()), "val")
    questions, skipped = load_split(data_dir, split, subjects, answers_required=not predict_only)
    pool = load_shot_pool(data_dir, list(questions), shots)
    mapping = load_mapping(data_dir)
    language = "zh" if is_chinese(q.question for qs in questions.values() for q in qs[:10]) else "en"
    if style is None:
        style = "ceval" if language == "zh" else "mmlu"
    elif STYLES[style].language != language:
        log.warning("%s: the questions look %s but the %s prompt is %s", data_dir, language, style,
                    STYLES[style].language)
    head = {"data": str(data_dir), "split": split, "data_language": language}
    if predict_only:
        scored = score_questions(params, cfg, tokenizer, questions, pool, shots=shots, mapping=mapping, style=style,
                                 batch_size=batch_size, max_len=max_len)
        submission = defaultdict(dict)
        for p in scored.pop("predictions"):
            submission[p["subject"]][p["id"]] = p["prediction"]
        return {**head, **scored, "submission": dict(submission)}
    report = evaluate_questions(params, cfg, tokenizer, questions, pool, shots=shots, mapping=mapping, style=style,
                                batch_size=batch_size, max_len=max_len)
    return {**head, **report, "skipped": dict(skipped)}


def score_questions(params, cfg: ModelConfig, tokenizer, questions: dict[str, list[Question]],
                    shot_pool: dict[str, list[Question]] | None = None, *, shots: int = 5,
                    mapping: dict[str, dict] | None = None, style: str = "ceval", batch_size: int = 8,
                    max_len: int | None = None) -> dict:
    """Each question's predicted letter and option probabilities (answers are not needed), plus how the
    prompts were built: the shots asked for, questions that got fewer (a small pool), shots dropped and
    questions cut to fit the context.

    questions / shot_pool: subject -> questions (in memory; see `Question`). The first `shots` of a subject's
    pool, minus the question itself, are its shots. mapping: subject -> {"name", "category"}."""
    shot_pool, mapping = shot_pool or {}, mapping or {}
    prompt_style = STYLES[style]
    option_ids = option_token_ids(tokenizer, prompt_style)
    max_len = max_len or cfg.max_seq_len

    flat, prompts, dropped, truncated, short = [], [], 0, 0, 0
    for subject, qs in questions.items():
        name = mapping.get(subject, {}).get("name", subject.replace("_", " "))
        for q in qs:
            if not 2 <= len(q.options) <= len(LETTERS) or (q.answer and q.answer not in LETTERS[:len(q.options)]):
                raise ValueError(f"{q.where}: {len(q.options)} options with answer {q.answer!r}; expected 2 to "
                                 f"{len(LETTERS)} options and a letter among them")
            # A question is never its own shot (when the scored split is also the shot split).
            pool = [s for s in shot_pool.get(subject, []) if s is not q and not (s.where and s.where == q.where)]
            pool = pool[:shots]
            short += len(pool) < shots
            ids, kept, cut = fit_prompt(tokenizer, name, pool, q, prompt_style, max_len)
            dropped += len(pool) - kept
            truncated += cut
            flat.append(q)
            prompts.append(ids)
    if short:
        log.warning("%d questions got fewer than %d shots: their subject's pool is smaller", short, shots)
    t0 = time.perf_counter()
    logits = score_prompts(params, cfg, prompts, option_ids, batch_size)
    elapsed = time.perf_counter() - t0
    if dropped or truncated:
        log.info("%d shots dropped and %d questions cut to fit %d tokens", dropped, truncated, max_len)
    predictions = []
    for q, row in zip(flat, logits):
        row = row[:len(q.options)]                 # a question with fewer options ignores the other letters
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        predictions.append({"subject": q.subject, "id": q.id, "answer": q.answer,
                            "prediction": LETTERS[int(np.argmax(row))],
                            "probs": [round(float(p), 6) for p in probs], "where": q.where})
    return {"style": style, "prompt_language": prompt_style.language, "shots": shots,
            "questions_with_fewer_shots": short, "shots_dropped": dropped, "questions_truncated": truncated,
            "questions": len(flat), "questions_per_s": len(flat) / elapsed if elapsed > 0 else 0.0,
            "predictions": predictions}


def evaluate_questions(params, cfg: ModelConfig, tokenizer, questions: dict[str, list[Question]],
                       shot_pool: dict[str, list[Question]] | None = None, *, shots: int = 5,
                       mapping: dict[str, dict] | None = None, style: str = "ceval", batch_size: int = 8,
                       max_len: int | None = None) -> dict:
    """Accuracy per subject, per category and overall (micro over questions; macro over subjects too), on
    `score_questions`' predictions. Every question needs its answer: an unanswered one would count as wrong."""
    mapping = mapping or {}
    unanswered = [q.where for qs in questions.values() for q in qs if not q.answer]
    if unanswered:
        raise ValueError(f"{unanswered[0]}: no answer ({len(unanswered)} questions without one); accuracy needs "
                         f"every answer; predict without scoring instead (predict_only)")
    if not any(questions.values()):
        raise ValueError("no questions to score")
    scored = score_questions(params, cfg, tokenizer, questions, shot_pool, shots=shots, mapping=mapping,
                             style=style, batch_size=batch_size, max_len=max_len)
    per_subject, per_category = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    for p in scored["predictions"]:
        ok = p["prediction"] == p["answer"]
        category = mapping.get(p["subject"], {}).get("category", "Other")
        for table, key in ((per_subject, p["subject"]), (per_category, category)):
            table[key][0] += ok
            table[key][1] += 1
    subjects_out = {s: {"name": mapping.get(s, {}).get("name", s), "category": mapping.get(s, {}).get("category",
                    "Other"), **_accuracy(*per_subject[s])} for s in questions if per_subject[s][1]}
    correct = sum(v[0] for v in per_subject.values())
    predictions = scored.pop("predictions")
    return {
        **scored,
        "overall": _accuracy(correct, len(predictions)),
        "macro_accuracy": float(np.mean([v["accuracy"] for v in subjects_out.values()])),
        "categories": {c: _accuracy(*v) for c, v in sorted(per_category.items())},
        "subjects": subjects_out,
        "predictions": predictions,
    }


def describe_prompts(report: dict) -> str:
    """One line: how the prompts were built (shots, language, what was dropped)."""
    text = (f"{report['shots']}-shot, {report['style']} prompt ({report['prompt_language']}), "
            f"{report['shots_dropped']} shots dropped, {report['questions_truncated']} cut")
    if report["questions_with_fewer_shots"]:
        text += f", {report['questions_with_fewer_shots']} questions with fewer shots (small dev pool)"
    return text


def format_table(report: dict) -> str:
    lines = [f"{'subject':<44} {'category':<16} {'n':>5} {'acc':>7}", "-" * 75]
    for s, v in report["subjects"].items():
        lines.append(f"{s[:44]:<44} {v['category'][:16]:<16} {v['total']:>5} {100 * v['accuracy']:>6.2f}%")
    lines.append("-" * 75)
    for c, v in report["categories"].items():
        lines.append(f"{'[' + c + ']':<44} {'':<16} {v['total']:>5} {100 * v['accuracy']:>6.2f}%")
    o = report["overall"]
    lines.append(f"{'overall':<44} {'':<16} {o['total']:>5} {100 * o['accuracy']:>6.2f}%   "
                 f"(macro {100 * report['macro_accuracy']:.2f}%)")
    lines.append(f"prompts: {describe_prompts(report)}")
    if report.get("skipped"):
        lines.append(f"skipped rows: {report['skipped']}")
    return "\n".join(lines)


def format_submission_summary(report: dict) -> str:
    """What --predict_only prints: counts per subject, not a score."""
    counts = {s: len(v) for s, v in report["submission"].items()}
    return (f"predicted {sum(counts.values())} questions in {len(counts)} subjects of {report['data']} "
            f"({report['split']}); not scored. Prompts: {describe_prompts(report)}")
