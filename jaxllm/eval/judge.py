"""Pairwise LLM-as-judge: a judge model behind any OpenAI-compatible endpoint scores two answers per question.

The prompt follows FastChat's original Vicuna review (two 1-10 scores on the first line, then an
explanation). Each pair is judged twice, A first and then B first, and the two orders are averaged, since
judges favour a position; how often the verdict (win / tie / loss for A) changes with the order is reported
as the flip rate. A judgement whose scores cannot be read is kept in the JSONL, counted, and left out of the
means; when only one order parses, the pair uses that one.

Files: questions in BELLE's eval_set.json (JSON Lines: question, std_answer, class; ids are 0-based line
numbers) or FastChat's question.jsonl (question_id, category, turns | text; only the first turn is judged).
Answers are JSON Lines keyed by question_id (or id), else by line order, with the text in `text`,
`answer`, `output`, `response` or FastChat's choices[0].turns[0].

Resuming: every judge call appends one line to judgements.jsonl as it completes; a rerun skips the
(question, order) pairs already there and only calls the judge for the rest.

The judge is an endpoint (ChatClient; the endpoint applies its own chat template) or a checkpoint in this
process (LocalJudge), prompted with the chat template it was trained with unless told otherwise.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from jaxllm.data.formats import read_json_records
from jaxllm.eval.client import ChatClient, ClientError

log = logging.getLogger(__name__)

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
TEMPLATE = ("[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's "
            "Answer]\n\n[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
            "[System]\n{instruction}\n\n")
INSTRUCTION = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their "
    "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\nPlease first output a single line containing only two values indicating the "
    "scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent "
    "line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
    "ensuring that the order in which the responses were presented does not affect your judgment.")
ORDERS = ("ab", "ba")       # "ab": A is Assistant 1; "ba": B is Assistant 1


# ----------------------------------------------------------------------------------------------------
# Files.

def _jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    """(line, record) from a JSON Lines (or JSON array) file; every record must be an object."""
    for lineno, record in read_json_records(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, record


def load_questions(path: str | Path) -> list[dict]:
    """[{id, category, question, reference}] from a BELLE eval_set.json or a FastChat question.jsonl."""
    path = Path(path)
    out = []
    for index, (lineno, r) in enumerate(_jsonl(path)):
        if "turns" in r or "text" in r:                               # FastChat (llm_judge / legacy)
            text = r["turns"][0] if "turns" in r else r["text"]
            qid = r.get("question_id", index)
            reference = None
        elif "question" in r:                                         # BELLE
            text, qid, reference = r["question"], r.get("id", index), r.get("std_answer")
        else:
            raise ValueError(f"{path}:{lineno}: no field 'question', 'turns' or 'text'")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{lineno}: field question/turns/text is empty or not a string")
        # BELLE writes "closed qa" with a no-break space; one spelling per category keeps the table clean.
        category = " ".join(str(r.get("category", r.get("class", "default"))).replace("\u00a0", " ").split())
        out.append({"id": str(qid), "category": category, "question": text, "reference": reference})
    return out


def load_answers(path: str | Path) -> dict[str, str]:
    """question id -> answer text."""
    path = Path(path)
    out = {}
    for index, (lineno, r) in enumerate(_jsonl(path)):
        qid = str(r.get("question_id", r.get("id", index)))
        if "choices" in r:
            try:
                text = r["choices"][0]["turns"][0]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"{path}:{lineno}: field choices[0].turns[0] missing") from None
        else:
            key = next((k for k in ("text", "answer", "output", "response") if k in r), None)
            if key is None:
                raise ValueError(f"{path}:{lineno}: no answer field (text, answer, output, response or choices)")
            text = r[key]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: the answer is {type(text).__name__}, not a string")
        out[qid] = text
    return out


class LocalJudge:
    """A judge checkpoint in this process, behind the same request handling and batching engine as `jaxllm
    serve` (its parallel calls share decode steps), prompted with `template`; a ChatClient's `chat`."""
    NAME = "local-judge"

    def __init__(self, params, cfg, tokenizer, template, max_batch: int = 8):
        from jaxllm.serve.api import OpenAIServer
        from jaxllm.serve.engine import Engine
        self.app = OpenAIServer(Engine(params, cfg, tokenizer, max_batch=max_batch), self.NAME, template)

    def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int | None = None) -> str:
        from jaxllm.serve.api import RequestError
        try:
            body = self.app.chat({"model": self.NAME, "messages": messages, "temperature": temperature,
                                  "max_tokens": max_tokens, "seed": 0})
        except RequestError as e:        # e.g. a question too long for the judge's context: counted, not fatal
            raise ClientError(e.message, e.status) from None
        return body["choices"][0]["message"]["content"]

    def close(self) -> None:
        self.app.engine.close()


# ----------------------------------------------------------------------------------------------------
# One judgement.

def judge_messages(question: str, answer_1: str, answer_2: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": TEMPLATE.format(question=question, answer_1=answer_1, answer_2=answer_2,
                                                        instruction=INSTRUCTION)}]


_NUMBER = r"(10(?:\.0+)?|\d(?:\.\d+)?)"


def parse_scores(text: str) -> tuple[float, float] | None:
    """(score of Assistant 1, score of Assistant 2) in [0, 10], or None.

    The requested form is a first line with exactly two numbers ("8 6", "8, 6", "8/10 6/10"); failing that,
    "Assistant 1: 8 ... Assistant 2: 6" anywhere in the text."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        first = re.sub(r"/\s*10\b|Assistant\s*\d", "", lines[0])    # "8/10" is 8; "Assistant 1" is no score
        tokens = re.findall(r"-?\d+(?:\.\d+)?", first)
        if len(tokens) == 2 and len(first) <= 40:      # a short line of two numbers, not a sentence
            a, b = float(tokens[0]), float(tokens[1])
            if 0 <= a <= 10 and 0 <= b <= 10:
                return a, b
    m1 = re.search(r"Assistant\s*1\D{0,20}?" + _NUMBER, text)
    m2 = re.search(r"Assistant\s*2\D{0,20}?" + _NUMBER, text)
    if m1 and m2:
        return float(m1.group(1)), float(m2.group(1))
    return None


def _verdict(a: float, b: float) -> str:
    return "win" if a > b else "loss" if a < b else "tie"


# ----------------------------------------------------------------------------------------------------
# A run.

def read_judgements(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for _, r in _jsonl(path)]


def run_judge(questions: list[dict], answers_a: dict[str, str], answers_b: dict[str, str], client: ChatClient,
              out_dir: str | Path, *, parallel: int = 4, max_tokens: int = 512) -> dict:
    """Judges every question present in both answer sets, in both orders; writes out_dir/judgements.jsonl and
    out_dir/summary.json; returns the summary. Resumes from an existing judgements.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "judgements.jsonl"
    done = {(r["question_id"], r["order"]) for r in read_judgements(path)}
    missing = [q["id"] for q in questions if q["id"] not in answers_a or q["id"] not in answers_b]
    if missing:
        log.warning("%d questions lack an answer from A or B and are skipped (first: %s)", len(missing), missing[:5])
    if not questions:
        raise ValueError("no questions to judge (an empty questions file, or --max_questions=0)")
    if len(missing) == len(questions):
        raise ValueError(f"none of the {len(questions)} questions has an answer from both A and B (question ids "
                         f"{', '.join(q['id'] for q in questions[:5])}, ...): do the answer files' question_id / id "
                         f"(or line order) match the questions?")
    todo = [(q, order) for q in questions if q["id"] not in missing for order in ORDERS if (q["id"], order) not in done]
    log.info("judging %d calls (%d already in %s)", len(todo), len(done), path)
    lock = threading.Lock()
    failures = Counter()
    last_error = []

    def one(q: dict, order: str) -> None:
        first, second = (answers_a, answers_b) if order == "ab" else (answers_b, answers_a)
        messages = judge_messages(q["question"], first[q["id"]], second[q["id"]])
        try:
            text = client.chat(messages, temperature=0.0, max_tokens=max_tokens)
        except ClientError as e:   # not recorded: a resumed run tries it again
            log.error("question %s order %s: %s", q["id"], order, e)
            with lock:
                failures[str(e.status or "network")] += 1
                last_error[:] = [e]
            return
        scores = parse_scores(text)
        record = {"question_id": q["id"], "category": q["category"], "order": order, "judgement": text,
                  "scores": list(scores) if scores else None}
        with lock, path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for fut in [pool.submit(one, q, order) for q, order in todo]:
            fut.result()
    failed = sum(failures.values())
    if todo and failed == len(todo):
        # No score can be reported, and no summary is written: a rerun after fixing the endpoint starts clean.
        counts = ", ".join(f"{n} x {status}" for status, n in failures.most_common())
        raise ClientError(f"all {failed} judge calls failed ({counts}); last: {last_error[0]}; nothing was written "
                          f"to {out}", last_error[0].status)
    if failed:
        log.warning("%d of %d judge calls failed (%s); the summary leaves those pairs out: rerun to retry them",
                    failed, len(todo), dict(failures))
    summary = aggregate(read_judgements(path))
    summary["failed_calls"] = dict(failures)
    summary["skipped_questions"] = len(missing)
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    return summary


def aggregate(judgements: list[dict]) -> dict:
    """Per-pair A/B scores (mean over the parsed orders), win/tie/loss for A, position-bias flip rate, per
    category and overall."""
    by_question = defaultdict(dict)
    for r in judgements:
        by_question[r["question_id"]][r["order"]] = r
    unparseable = sum(1 for r in judgements if r["scores"] is None)
    cats = defaultdict(lambda: {"pairs": 0, "score_a": 0.0, "score_b": 0.0, "win": 0, "tie": 0, "loss": 0})
    flips = both = unjudged = 0
    for qid, orders in by_question.items():
        # From A's point of view: in order "ba" Assistant 1 is B.
        views = {o: (r["scores"] if o == "ab" else r["scores"][::-1]) for o, r in orders.items() if r["scores"]}
        if not views:
            unjudged += 1
            continue
        if len(views) == 2:
            both += 1
            flips += _verdict(*views["ab"]) != _verdict(*views["ba"])
        a = sum(v[0] for v in views.values()) / len(views)
        b = sum(v[1] for v in views.values()) / len(views)
        category = next(iter(orders.values()))["category"]
        for key in (category, "overall"):
            c = cats[key]
            c["pairs"] += 1
            c["score_a"] += a
            c["score_b"] += b
            c[_verdict(a, b)] += 1
    for c in cats.values():
        c["score_a"] /= c["pairs"]
        c["score_b"] /= c["pairs"]
        c["win_rate"] = (c["win"] + 0.5 * c["tie"]) / c["pairs"]
    overall = cats.pop("overall", {"pairs": 0})
    return {"overall": overall, "categories": dict(sorted(cats.items())), "judgements": len(judgements),
            "unparseable_judgements": unparseable, "pairs_without_scores": unjudged,
            "pairs_judged_in_both_orders": both, "position_flip_rate": flips / both if both else 0.0}


def format_table(summary: dict) -> str:
    lines = [f"{'category':<24} {'pairs':>5} {'A':>6} {'B':>6} {'win':>5} {'tie':>5} {'loss':>5}", "-" * 62]
    rows = list(summary["categories"].items()) + [("overall", summary["overall"])]
    for name, c in rows:
        if c.get("pairs"):
            lines.append(f"{name[:24]:<24} {c['pairs']:>5} {c['score_a']:>6.2f} {c['score_b']:>6.2f} "
                         f"{c['win']:>5} {c['tie']:>5} {c['loss']:>5}")
    lines.append(f"position flip rate {summary['position_flip_rate']:.3f} over {summary['pairs_judged_in_both_orders']}"
                 f" pairs; {summary['unparseable_judgements']} of {summary['judgements']} judgements unparseable")
    failed = sum(summary.get("failed_calls", {}).values())
    if failed:
        lines.append(f"INCOMPLETE: {failed} judge calls failed ({summary['failed_calls']}); rerun the same command "
                     f"to judge only those")
    return "\n".join(lines)
