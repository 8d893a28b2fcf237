"""Reading multiple-choice sets: the C-Eval, CMMLU and MMLU CSV layouts, their subject mappings, and the
language their questions are written in.

Layouts (all four options A-D), told apart by their first row:
  C-Eval  <dir>/{dev,val,test}/<subject>_<split>.csv  header id,question,A,B,C,D,answer[,explanation]
  CMMLU   <dir>/{dev,test}/<subject>.csv              header ,Question,A,B,C,D,Answer (unnamed index first)
  MMLU    <dir>/{dev,val,test}/<subject>_<split>.csv  no header: question,A,B,C,D,answer
`<dir>/subject_mapping.json` (subject -> {"name", "category"}, or C-Eval's [english, chinese, category]) gives
each subject's display name and category.

A row without an answer is skipped and counted, unless the caller only wants predictions
(`answers_required=False`, C-Eval's test split, whose answers are hidden): then its answer is "".
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger(__name__)
LETTERS = ("A", "B", "C", "D")
HEADER_COLUMNS = ("question", "a", "b", "c", "d", "answer")   # what a header must name (any case)


@dataclasses.dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    options: tuple[str, ...]   # 2 to 4 options, lettered A, B, ... (the CSV layouts always have 4)
    answer: str           # "A".."D"; "" where the set hides it (predictions only)
    where: str            # "file:line", for error messages and the predictions file


def _is_header(first: list[str]) -> bool:
    """A header names its columns; a headerless MMLU row starts with a question. A header that lacks some
    column (an answer, say) is still a header, so it is reported, not read as a question."""
    names = set(first)
    return "question" in names or "answer" in names or {"a", "b", "c", "d"} <= names


def read_csv(path: str | Path, subject: str | None = None, *, answers_required: bool = True
             ) -> tuple[list[Question], Counter]:
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
    if _is_header(first):
        wanted = HEADER_COLUMNS if answers_required else HEADER_COLUMNS[:-1]
        missing = [name for name in wanted if name not in first]
        if missing:
            hint = (" (a split whose answers are hidden, such as C-Eval's test split, can only be predicted: "
                    "pass --predict_only)" if missing == ["answer"] else "")
            raise ValueError(f"{path}:1: header has columns {rows[0][1]}, missing {missing}; expected "
                             f"[id,]question,A,B,C,D,answer (any case){hint}")
        col = {name: first.index(name) for name in HEADER_COLUMNS if name in first}
        id_col = first.index("id") if "id" in first else 0 if first[0] == "" else None
        body = rows[1:]
    else:   # MMLU: no header, six positional columns
        col = dict(zip(HEADER_COLUMNS, range(len(HEADER_COLUMNS))))
        id_col, body = None, rows
    width = max(col.values()) + 1
    for n, (line, row) in enumerate(body):
        where = f"{path}:{line}"
        if len(row) < width:
            raise ValueError(f"{where}: {len(row)} columns, expected at least {width} "
                             f"(question, A, B, C, D, answer)")
        answer = row[col["answer"]].strip() if "answer" in col and col["answer"] < len(row) else ""
        if not answer and answers_required:
            skipped["no answer"] += 1
            continue
        if answer and answer not in LETTERS:
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


def load_split(data_dir: str | Path, split: str, subjects: Sequence[str] | None = None, *,
               answers_required: bool = True) -> tuple[dict[str, list[Question]], Counter]:
    """subject -> questions of <data_dir>/<split>/*.csv, and the skip counts summed over files.

    Every row of the split lacking an answer is an error (it would score 0 of 0), with a hint."""
    directory = Path(data_dir) / split
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no {split!r} split here (expected <data>/{split}/*.csv)")
    out, skipped = {}, Counter()
    for path in sorted(directory.glob("*.csv")):
        subject = subject_of(path)
        if subjects and subject not in subjects:
            continue
        out[subject], s = read_csv(path, subject, answers_required=answers_required)
        skipped += s
    if not out:
        raise FileNotFoundError(f"{directory}: no CSV files" + (f" for subjects {list(subjects)}" if subjects else ""))
    if not any(out.values()):
        if not skipped["no answer"]:
            raise ValueError(f"{directory}: its CSV files hold no questions")
        raise ValueError(f"{directory}: none of its {skipped['no answer']} questions has an answer, so there is "
                         f"nothing to score (C-Eval's test split hides its answers). Score a split with answers "
                         f"(--split=val), or pass --predict_only to write predictions in C-Eval's submission format")
    unanswered = [subject for subject, qs in out.items() if not qs]
    if unanswered:
        log.warning("%s: %d subjects have no answered question and are not scored: %s", directory,
                    len(unanswered), ", ".join(unanswered))
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


def is_chinese(texts: Iterable[str]) -> bool:
    """Whether the texts are mostly Chinese: more CJK ideographs than ASCII letters. Judged on the questions
    themselves, not on subject names (which are English file names when there is no subject_mapping.json)."""
    cjk = latin = 0
    for text in texts:
        for ch in text:
            if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf":
                cjk += 1
            elif ch.isascii() and ch.isalpha():
                latin += 1
    return cjk > latin
