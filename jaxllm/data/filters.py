"""Document-level quality filters in the spirit of Gopher (MassiveText), C4 and RefinedWeb, each with a
Chinese-aware variant, and language identification by script.

Word-based rules need words; Chinese has none between characters, so for CJK text a "unit" is one CJK
character (or one run of Latin letters/digits), CJK punctuation counts as punctuation, and the stop-word
rule looks for the commonest function characters. Each filter returns None (keep) or a short reason, and
`first_failure` applies them in `FILTER_ORDER`, so a removed document is charged to the first rule it
breaks (the report counts per rule). Thresholds default to the published ones (Gopher: Rae et al. 2021,
appendix A; C4: Raffel et al. 2020; RefinedWeb: Penedo et al. 2023) and are all in `FilterConfig`; the
CJK variants are calibrated on classic Chinese novels, prose and verse (benchmarks/filter_rates.py and
benchmarks/RESULTS.md), and Chinese verse (`is_verse`) is judged by its own rules.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"   # with extensions B-G (rare characters)
_KANA = "\u3040-\u30ff"
_HANGUL = "\uac00-\ud7af"
# One CJK character, or a run of other letters/digits (\w also matches CJK, hence the exclusion).
_CJK_UNIT = re.compile(rf"[{_HAN}{_KANA}{_HANGUL}]|[^\W_{_HAN}{_KANA}{_HANGUL}]+")
_TERMINAL = tuple('.!?"\'”’」』。！？．…)')   # ． (U+FF0E): older Chinese texts end sentences with it
# Chinese lines also end, complete, in 、；： (a list item, a clause before the next line, "其词曰：" before a poem)
# and in a full-width closing bracket.
_TERMINAL_CJK = _TERMINAL + tuple("、；：）")
_CLAUSE_BREAK = re.compile(r"\s*[，。！？；、：．]\s*")
_NOTE = re.compile(r"[(（][^()（）]*[)）]")   # an editor's note in a poem: "(顰 一作：蹙)", a variant reading
# Verse is written in clauses of 4, 5 or 7 characters (诗) or 3 to 7 (词): on the shared poetry the mean clause
# is at most 7.5 characters for 99.8% of poems, where a comma-separated list of nouns runs longer.
MAX_VERSE_CLAUSE = 7.5
# A clause of verse: up to 12 Han characters; □ marks a character lost in old editions, [字] one an editor
# restored, 《》 a title.
_HAN_CLAUSE = re.compile(rf"(?:[{_HAN}□《》]|\[[{_HAN}]+\]){{1,12}}")
_BULLETS = ("•", "●", "○", "▪", "■", "□", "◦", "‣", "·", "-", "*", "–", "—", "※", "★", "☆")
EN_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])   # Gopher's list
ZH_STOP_CHARS = frozenset("的了是在不有和人这我他也之而其一")   # commonest function characters, modern + classical
BOILERPLATE = {
    "en": ("cookie", "privacy policy", "terms of use", "terms of service", "javascript", "all rights reserved",
           "sign in", "log in", "click here", "subscribe", "powered by"),
    "zh": ("版权所有", "免责声明", "登录", "注册", "点击", "上一篇", "下一篇", "联系我们", "返回顶部", "关注我们",
           "扫描二维码", "备案号"),
}


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Thresholds; `units` are words (Latin scripts) or CJK characters (zh/ja/ko)."""
    min_units: int = 50                 # Gopher: 50 words; the same count of characters for CJK
    min_verse_units: int = 10           # Chinese verse (`is_verse`): one couplet of five-character lines
    max_units: int = 100_000
    mean_word_length: tuple = (3.0, 10.0)   # Latin: mean characters per word
    mean_clause_length: tuple = (2.0, 80.0)  # CJK: mean characters between punctuation marks
    max_symbol_ratio: float = 0.1       # ('#' + ellipses) per unit
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_units: float = 0.8        # units holding a letter or CJK character
    min_stop_words: int = 2
    max_dup_lines: float = 0.3          # share of lines that occur more than once
    max_dup_line_chars: float = 0.2
    max_dup_paragraphs: float = 0.3
    max_dup_paragraph_chars: float = 0.2
    max_dup_verse_clauses: float = 0.5  # Chinese verse: share of clauses repeating an earlier one
    top_ngram: tuple = ((2, 0.20), (3, 0.18), (4, 0.16))     # (n, max char share of the commonest n-gram)
    dup_ngram: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    # The same rules for CJK character units. A Chinese word averages about 1.5 characters, so Gopher's word
    # n-grams become character n-grams 1.5 times as long. The shares are calibrated on the shared classics
    # (benchmarks/filter_rates.py): parallel clauses (排比) of 论语/孟子 passages repeat 8-grams over 27% of
    # the text at the 99th percentile and top 6-grams reach 17%, where Gopher's 15% and 16% removed 5% of
    # them; a page that repeats itself covers 50% and more (tests/test_filters_zh.py's junk set).
    top_ngram_cjk: tuple = ((3, 0.20), (5, 0.20), (6, 0.20))
    dup_ngram_cjk: tuple = ((8, 0.30), (9, 0.29), (11, 0.28), (12, 0.27), (14, 0.26), (15, 0.25))
    min_terminal_lines: float = 0.5     # C4: lines end in terminal punctuation (here: at least half of them)
    max_boilerplate_lines: float = 0.3  # C4/RefinedWeb: navigation, cookie and copyright lines


# ------------------------------------------------------------------------------------------- language

def script_counts(text: str) -> collections.Counter:
    """Letters by script: han, kana, hangul, latin, cyrillic, arabic, other."""
    counts = collections.Counter()
    for ch in text:
        o = ord(ch)
        if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF:
            counts["han"] += 1
        elif 0x3040 <= o <= 0x30FF:
            counts["kana"] += 1
        elif 0xAC00 <= o <= 0xD7AF:
            counts["hangul"] += 1
        elif ch.isalpha():
            name = unicodedata.name(ch, "")
            counts["latin" if name.startswith("LATIN") else "cyrillic" if name.startswith("CYRILLIC")
                   else "arabic" if name.startswith("ARABIC") else "other"] += 1
    return counts


def detect_language(text: str) -> str:
    """By script: "zh" (Han), "ja" (Han with kana), "ko", "en" (any Latin-script language: a script cannot
    tell English from French), "ru" (Cyrillic), "ar", or "unknown"."""
    c = script_counts(text)
    letters = sum(c.values())
    if not letters:
        return "unknown"
    if c["kana"] >= 0.1 * letters:
        return "ja"
    if c["hangul"] >= 0.3 * letters:
        return "ko"
    if c["han"] >= 0.3 * letters:
        return "zh"
    best = max(("latin", "cyrillic", "arabic"), key=lambda s: c[s])
    return {"latin": "en", "cyrillic": "ru", "arabic": "ar"}[best] if c[best] >= 0.5 * letters else "unknown"


def is_cjk(lang: str) -> bool:
    return lang in ("zh", "ja", "ko")


def units(text: str, lang: str) -> list[str]:
    """Words for Latin-script text; CJK characters (and Latin runs) for Chinese, Japanese, Korean."""
    return _CJK_UNIT.findall(text) if is_cjk(lang) else text.split()


# -------------------------------------------------------------------------------------------- filters

def _lines(text: str) -> list[str]:
    return [l.strip() for l in text.split("\n") if l.strip()]


def is_verse(text: str, lang: str) -> bool:
    """Chinese verse (shi, ci, songs, rhymed primers): every line made only of short Han clauses between
    Chinese punctuation marks, a line end closing the last one (many editions print no mark there).

    Such text is complete however short (a quatrain is 20 characters), carries no function words (classical
    verse drops them) and needs no mark at a line end, so `min_units`, the stop-word rule and the terminal
    rule, which Gopher and C4 calibrated on English web pages, misjudge it. Web junk does not look like this:
    navigation, keyword lists and tables carry spaces, '|', digits or Latin letters, a long unpunctuated run
    is not a clause, and lists of nouns run longer between commas than verse does. What still looks like verse
    (a list of four-character items between Chinese commas) is judged by the repetition rule alone."""
    if not is_cjk(lang):
        return False
    lines = _lines(_NOTE.sub("", text))
    if 2 * sum(bool(_CLAUSE_BREAK.search(line)) for line in lines) < len(lines):   # a menu: bare phrases
        return False
    clauses = verse_clauses(text)
    return (len(clauses) >= 2 and all(_HAN_CLAUSE.fullmatch(c) for c in clauses)
            and sum(map(len, clauses)) / len(clauses) <= MAX_VERSE_CLAUSE)


def verse_clauses(text: str) -> list[str]:
    """The clauses of `text` between Chinese punctuation marks and line ends, editors' notes left out."""
    return [c for line in _lines(_NOTE.sub("", text)) for c in _CLAUSE_BREAK.split(line) if c]


def f_length(text, lang, u, cfg):
    low = cfg.min_verse_units if len(u) < cfg.min_units and is_verse(text, lang) else cfg.min_units
    return None if low <= len(u) <= cfg.max_units else f"{len(u)} units"


def f_word_length(text, lang, u, cfg):
    if is_cjk(lang):   # no word boundaries: the length of clauses between punctuation marks instead
        clauses = [c for c in re.split(r"[\W_]+", text) if c]
        mean = sum(map(len, clauses)) / max(len(clauses), 1)
        lo, hi = cfg.mean_clause_length
    else:
        words = [w for w in u if any(ch.isalnum() for ch in w)]
        mean = sum(map(len, words)) / max(len(words), 1)
        lo, hi = cfg.mean_word_length
    return None if lo <= mean <= hi else f"mean {mean:.1f}"


def f_symbols(text, lang, u, cfg):
    symbols = text.count("#") + text.count("...") + text.count("…")
    if is_cjk(lang):   # Chinese pages decorate with ★◆●【】→ rather than '#'; □ stands for a lost character
        symbols += sum(unicodedata.category(ch).startswith("S") and ch not in "#□" for ch in text)
    ratio = symbols / max(len(u), 1)
    return None if ratio <= cfg.max_symbol_ratio else f"{ratio:.2f} symbols per unit"


def f_bullets_ellipsis(text, lang, u, cfg):
    lines = _lines(text) or [""]
    # A Chinese line may open with the dash "——" (speech broken off, a list of titles): not a bullet.
    bullets = sum(l.startswith(_BULLETS) and not (is_cjk(lang) and l.startswith("——")) for l in lines) / len(lines)
    ellipsis = sum(l.endswith(("...", "…")) for l in lines) / len(lines)
    if bullets > cfg.max_bullet_lines:
        return f"{bullets:.0%} bullet lines"
    return None if ellipsis <= cfg.max_ellipsis_lines else f"{ellipsis:.0%} lines end in an ellipsis"


def f_alpha(text, lang, u, cfg):
    share = sum(any(ch.isalpha() for ch in w) for w in u) / max(len(u), 1)
    return None if share >= cfg.min_alpha_units else f"{share:.0%} alphabetic units"


def f_stop_words(text, lang, u, cfg):
    if is_verse(text, lang):
        return None
    if is_cjk(lang):
        found = sum(ch in ZH_STOP_CHARS for ch in text)
    else:
        found = sum(w.lower().strip(".,;:!?\"'()") in EN_STOP_WORDS for w in u)
    return None if found >= cfg.min_stop_words else f"{found} stop words"


def _dup_share(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of their characters)."""
    seen, dup, dup_chars = set(), 0, 0
    for it in items:
        if it in seen:
            dup, dup_chars = dup + 1, dup_chars + len(it)
        seen.add(it)
    return dup / max(len(items), 1), dup_chars / max(sum(map(len, items)), 1)


def f_repetition(text, lang, u, cfg):
    if is_verse(text, lang):
        # Verse repeats whole clauses by design (refrains, the varied stanzas of 诗经), so Gopher's n-gram
        # shares, calibrated on prose, would drop classics; a page that repeats itself repeats whole clauses
        # far more than half the time.
        clauses, _ = _dup_share(verse_clauses(text))
        return None if clauses <= cfg.max_dup_verse_clauses else f"duplicate verse clauses {clauses:.0%}"
    lines, chars = _dup_share(_lines(text))
    if lines > cfg.max_dup_lines or chars > cfg.max_dup_line_chars:
        return f"duplicate lines {lines:.0%} ({chars:.0%} of characters)"
    paras, chars = _dup_share([p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()])
    if paras > cfg.max_dup_paragraphs or chars > cfg.max_dup_paragraph_chars:
        return f"duplicate paragraphs {paras:.0%}"
    lengths = [len(w) for w in u]
    total = max(sum(lengths), 1)
    top_ngram, dup_ngram = (cfg.top_ngram_cjk, cfg.dup_ngram_cjk) if is_cjk(lang) else (cfg.top_ngram, cfg.dup_ngram)
    for n, limit in top_ngram:
        grams = collections.Counter(tuple(u[i:i + n]) for i in range(len(u) - n + 1))
        if grams:
            gram, count = grams.most_common(1)[0]
            share = count * sum(map(len, gram)) / total
            if count > 1 and share > limit:
                return f"top {n}-gram {''.join(gram) if is_cjk(lang) else ' '.join(gram)!r} covers {share:.0%}"
    for n, limit in dup_ngram:
        grams = collections.Counter(tuple(u[i:i + n]) for i in range(len(u) - n + 1))
        covered = [False] * len(u)
        for i in range(len(u) - n + 1):
            if grams[tuple(u[i:i + n])] > 1:
                covered[i:i + n] = [True] * n
        share = sum(l for l, c in zip(lengths, covered) if c) / total
        if share > limit:
            return f"duplicate {n}-grams cover {share:.0%}"
    return None


def f_terminal(text, lang, u, cfg):
    if is_verse(text, lang):   # a verse line ends at the line break
        return None
    lines = _lines(text)
    share = sum(l.endswith(_TERMINAL_CJK if is_cjk(lang) else _TERMINAL) for l in lines) / max(len(lines), 1)
    return None if share >= cfg.min_terminal_lines else f"{share:.0%} lines end in terminal punctuation"


def f_boilerplate(text, lang, u, cfg):
    low = text.lower()
    if "lorem ipsum" in low:
        return "lorem ipsum"
    phrases = BOILERPLATE["zh" if is_cjk(lang) else "en"]
    lines = [l.lower() for l in _lines(text)]
    # Navigation, cookie and copyright lines are short; a phrase inside a long paragraph is just prose.
    share = sum(len(l) <= 200 and any(p in l for p in phrases) for l in lines) / max(len(lines), 1)
    return None if share <= cfg.max_boilerplate_lines else f"{share:.0%} boilerplate lines"


FILTERS = {"length": f_length, "word_length": f_word_length, "symbols": f_symbols,
           "bullets_ellipsis": f_bullets_ellipsis, "alpha": f_alpha, "stop_words": f_stop_words,
           "repetition": f_repetition, "terminal_punct": f_terminal, "boilerplate": f_boilerplate}
FILTER_ORDER = ("language",) + tuple(FILTERS)


def first_failure(text: str, want_lang: str = "any", cfg: FilterConfig = FilterConfig(),
                  skip: tuple = ()) -> tuple[str, str] | None:
    """(filter name, reason) of the first rule `text` breaks, or None when it passes them all.

    want_lang: keep only this script-detected language ("zh", "en", ...); "any" keeps all."""
    lang = detect_language(text)
    if want_lang != "any" and lang != want_lang:
        return "language", f"detected {lang}"
    u = units(text, lang)
    for name, fn in FILTERS.items():
        if name in skip:
            continue
        reason = fn(text, lang, u, cfg)
        if reason is not None:
            return name, reason
    return None
