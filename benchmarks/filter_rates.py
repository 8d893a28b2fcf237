"""Quality-filter removal rates on good Chinese text: each filter's share of documents removed (alone, and
charged as the first rule broken, as `clean` reports it) on whole-sentence novel passages and whole poems.

Run (figures go to benchmarks/RESULTS.md):
  python benchmarks/filter_rates.py            # every passage and poem
  python benchmarks/filter_rates.py --every=5  # every 5th, quicker

Text (../shared/data/text/zh):
  novels   红楼梦, 西游记, 三国演义 cut into whole-sentence passages of at least 200 characters
           (`sentence_passages`); paragraph breaks stay as newlines, as a web page would have them;
  verse    every poem, ci and song of chinese-poetry (Tang poems, Song ci, 诗经, 楚辞, 曹操, 纳兰性德,
           唐诗三百首, 千字文, 三字经), its lines joined with newlines, whatever its length;
  prose    the classical prose of chinese-poetry (论语, 孟子, 大学, 中庸, 古文观止) cut into whole-sentence
           passages like the novels, and (for reference) one document per chapter or piece.
Every good document should pass; what a filter removes here is what it would wrongly drop from a real corpus.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ZH = SHARED / "text" / "zh"
NOVELS = ("hongloumeng", "xiyouji", "sanguoyanyi")
VERSE = ("quantangshi", "songci", "shijing", "chuci", "caocao", "nalanxingde", "mengxue/tangshisanbaishou.json",
         "mengxue/qianziwen.json", "mengxue/sanzijing-new.json")
PROSE = ("lunyu", "sishuwujing", "mengxue/guwenguanzhi.json")
MIN_PASSAGE = 200

# A sentence ends at 。！？ (or ．, which 红楼梦 uses for 。), with any closing quotes or brackets after it,
# or at a line end (chapter titles, verse lines without punctuation). This 红楼梦 writes inner quotes as
# `…-, so "-" after a sentence mark closes a quote too (else the next passage would open with it).
_SENTENCE = re.compile(r"[^\n]*?(?:[。！？．]+[”’」』\"')）-]*|$)")


def sentences(text: str) -> list[str]:
    """Whole sentences of `text`, in order, each ending in its sentence mark or a line break ("\\n")."""
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        parts = [s for s in _SENTENCE.findall(line.strip()) if s]
        if parts:
            out += parts[:-1] + [parts[-1] + "\n"]
    return out


def sentence_passages(text: str, min_chars: int = MIN_PASSAGE) -> list[str]:
    """Consecutive whole sentences accumulated until at least `min_chars` characters; the short tail is
    dropped (it is not a passage of the asked length)."""
    out, cur = [], ""
    for s in sentences(text):
        cur += s
        if len(cur.strip()) >= min_chars:
            out.append(cur.strip())
            cur = ""
    return out


def novel_passages(shared: Path = SHARED) -> list[str]:
    out = []
    for name in NOVELS:
        out += sentence_passages((shared / "text/zh/novels" / f"{name}.txt").read_text(encoding="utf-8"))
    return out


def _pieces(obj) -> list[list[str]]:
    """Every record's lines: a dict holding a list of strings under paragraphs/content/para, at any depth."""
    if isinstance(obj, list):
        return [p for item in obj for p in _pieces(item)]
    if not isinstance(obj, dict):
        return []
    for key in ("paragraphs", "content", "para"):
        lines = obj.get(key)
        if isinstance(lines, list) and lines and all(isinstance(l, str) for l in lines):
            return [lines]
    return [p for v in obj.values() if isinstance(v, (list, dict)) for p in _pieces(v)]


def poetry_documents(names, shared: Path = SHARED) -> list[str]:
    """One document per poem (or prose piece): its lines joined with newlines, files in sorted order."""
    out = []
    for name in names:
        path = shared / "text/zh/chinese-poetry" / name
        for f in sorted(path.glob("*.json")) if path.is_dir() else [path]:
            for lines in _pieces(json.loads(f.read_text(encoding="utf-8"))):
                doc = "\n".join(l.strip() for l in lines if l.strip())
                if doc:
                    out.append(doc)
    return out


def corpora(shared: Path = SHARED) -> dict[str, list[str]]:
    """The issue's units (novel and classical-prose passages, whole poems) and, for reference, the classical
    prose as whole chapters (up to 5,800 characters)."""
    prose = poetry_documents(PROSE, shared)
    return {"novels": novel_passages(shared), "verse": poetry_documents(VERSE, shared),
            "prose": [p for piece in prose for p in sentence_passages(piece)], "prose chapters": prose}


def removal_rates(docs: list[str], cfg=None) -> dict:
    """{"alone": {filter: share removed by it alone}, "first": {filter: share charged to it}, "passed": share}."""
    from jaxllm.data.filters import FILTERS, FilterConfig, detect_language, units
    cfg = cfg or FilterConfig()
    alone, first, passed = collections.Counter(), collections.Counter(), 0
    for text in docs:
        lang = detect_language(text)
        u = units(text, lang)
        failed = [name for name, fn in FILTERS.items() if fn(text, lang, u, cfg) is not None]
        if lang != "zh":
            failed.insert(0, "language")
        alone.update(failed)
        first.update(failed[:1])
        passed += not failed
    n = max(len(docs), 1)
    return {"alone": {k: v / n for k, v in alone.items()}, "first": {k: v / n for k, v in first.items()},
            "passed": passed / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=1, help="measure every Nth document of each corpus")
    parser.add_argument("--examples", type=int, default=0, help="print this many removed documents per filter")
    args = parser.parse_args()
    from jaxllm.data.filters import FILTER_ORDER, first_failure
    table = {}
    for name, docs in corpora().items():
        docs = docs[::args.every]
        table[name] = (len(docs), removal_rates(docs))
        if args.examples:
            shown = collections.Counter()
            for text in docs:
                failure = first_failure(text, "zh")
                if failure and shown[failure[0]] < args.examples:
                    shown[failure[0]] += 1
                    print(f"[{name}] {failure[0]} ({failure[1]}): {text[:120]!r}")
    print("| filter | " + " | ".join(f"{n} ({count:,}) alone / first" for n, (count, _) in table.items()) + " |")
    print("|---|" + "---|" * len(table))
    for f in FILTER_ORDER:
        cells = [f"{r['alone'].get(f, 0):.2%} / {r['first'].get(f, 0):.2%}" for _, r in table.values()]
        print(f"| {f} | " + " | ".join(cells) + " |")
    print("| **passed all** | " + " | ".join(f"**{r['passed']:.2%}**" for _, r in table.values()) + " |")


if __name__ == "__main__":
    main()
