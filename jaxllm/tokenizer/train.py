"""Train a SentencePiece tokenizer for Chinese + English LLM pretraining.

The recipe follows LLaMA's tokenizer, plus a pad piece: BPE with byte fallback (no text is ever `<unk>`),
digits split one per piece (better arithmetic), identity normalization and kept whitespace (so
`decode(encode(x)) == x` exactly: NFKC would turn Chinese full-width punctuation into ASCII), and a high
character coverage because Chinese has thousands of characters that must be pieces of their own. Training
sentences are passages of several lines with their newlines, so "\\n", paragraph breaks and indentation get
pieces of their own instead of falling back to the byte <0x0A>.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Sized

import sentencepiece as spm

from jaxllm import storage
from jaxllm.progress import ProgressLog
from jaxllm.tokenizer.tokenizer import MODEL_FILENAME, Tokenizer

log = logging.getLogger(__name__)

# (id, piece) of the special pieces: LLaMA's unk/bos/eos at 0..2, then a pad at 3.
SPECIAL_PIECES = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}

MODEL_TYPES = ("bpe", "unigram", "char", "word")


class _Lines:
    """The training sentences of all inputs, one pass.

    Documents are cut into passages of whole lines (`_passages`) that keep their newlines, so that "\\n",
    blank lines and indentation become pieces as text has them; files are read a line at a time. Empty
    sentences and sentences over `max_bytes` UTF-8 bytes are skipped and counted. sentencepiece turns an exception raised inside its sentence iterator into an opaque
    RuntimeError, so the first error is also kept here and re-raised as it was.
    """

    def __init__(self, texts: Iterable[str] | None, input_files: Sequence[str], max_bytes: int):
        self.texts, self.input_files, self.max_bytes = texts, input_files, max_bytes
        self.kept = self.empty = self.too_long = 0
        self.error: BaseException | None = None
        # Reading a large corpus takes minutes: a progress line per interval, in bytes of text read.
        self.progress = ProgressLog("tokenizer: reading text", _input_bytes(texts, input_files), "bytes", logger=log)
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._all_lines()
        except Exception as e:
            self.error = e
            raise
        self.progress.finish()
        log.info("tokenizer: sentencepiece trains on the %d lines kept (it reports no progress itself)", self.kept)

    def _all_lines(self) -> Iterator[str]:
        if self.texts is not None:
            for i, doc in enumerate(self.texts):
                if not isinstance(doc, str):
                    raise TypeError(f"texts[{i}] is {type(doc).__name__}, not str")
                yield from self._keep(_passages(doc, self.max_bytes // 4))
        for path in self.input_files:
            yield from self._keep(_file_lines(path))

    def _keep(self, lines: Iterable[str]) -> Iterator[str]:
        for line in lines:
            size = len(line.encode("utf-8"))
            self.bytes_read += size + 1
            self.progress.update(self.bytes_read)
            if not line.strip():
                self.empty += 1
            elif size > self.max_bytes:
                self.too_long += 1
            else:
                self.kept += 1
                yield line


def _passages(doc: str, max_bytes: int) -> Iterator[str]:
    """Runs of consecutive lines of `doc`, joined with their newlines, each of at most `max_bytes` UTF-8 bytes
    unless one line alone is longer (that line is then a passage of its own)."""
    run, size = [], 0
    for line in doc.split("\n"):
        n = len(line.encode("utf-8")) + 1
        if run and size + n > max_bytes:
            yield "\n".join(run)
            run, size = [], 0
        run.append(line)
        size += n
    if run:
        yield "\n".join(run)


def _input_bytes(texts, input_files: Sequence[str]) -> int:
    """UTF-8 bytes to read (texts count only when sized: a list, not a generator)."""
    sized = isinstance(texts, Sized)
    text_bytes = sum(len(t.encode("utf-8")) + 1 for t in texts if isinstance(t, str)) if sized else 0
    return text_bytes + sum(os.path.getsize(p) for p in input_files)


def _file_lines(path: str) -> Iterator[str]:
    """Lines of a UTF-8 text file without their line ending; a bad byte names the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _describe_inputs(texts, input_files: Sequence[str]) -> str:
    parts = []
    if texts is not None:
        parts.append(f"texts ({type(texts).__name__})")
    if input_files:
        parts.append(f"input_files {list(input_files)}")
    return " and ".join(parts)


def _clear_error(e: RuntimeError, vocab_size: int, character_coverage: float) -> ValueError | None:
    """A ValueError saying what to change, for the sentencepiece failures a user can fix; else None."""
    msg = str(e)
    # e.g. "Vocabulary size too high (1000000). Please set it to a value <= 82312."
    if "Vocabulary size too high" in msg:
        m = re.search(r"<=\s*(\d+)", msg)
        limit = f"; sentencepiece says the maximum for it is {m.group(1)}" if m else ""
        return ValueError(f"vocab_size={vocab_size} is too large for this corpus{limit}. "
                          f"Use a smaller vocab_size or more text.")
    # e.g. "Vocabulary size is smaller than required_chars. 500 vs 2830."
    if "smaller than required_chars" in msg:
        m = re.search(r"(\d+)\s+vs\s+(\d+)", msg)
        need = f" at least {m.group(2)}" if m else ""
        return ValueError(f"vocab_size={vocab_size} is too small for this corpus: it needs{need} pieces for "
                          f"the special pieces, user-defined symbols and the characters kept by "
                          f"character_coverage={character_coverage}. Raise vocab_size or lower "
                          f"character_coverage.")
    return None


def train_tokenizer(texts: Iterable[str] | None = None, *, input_files: Sequence[str | os.PathLike] = (),
                    out_dir: str | os.PathLike, vocab_size: int = 8000, model_type: str = "bpe",
                    character_coverage: float = 0.99995, byte_fallback: bool = True, split_digits: bool = True,
                    user_defined_symbols: Sequence[str] = (), max_sentence_length: int = 16384,
                    input_sentence_size: int = 2_000_000, num_threads: int = 2, seed: int = 0) -> Tokenizer:
    """Trains a SentencePiece model on `texts` and/or `input_files`; writes `out_dir/tokenizer.{model,vocab}`.

    Args:
      texts: documents; each is cut into passages of whole lines (at most max_sentence_length / 4 bytes) that
        keep their newlines and indentation, and each non-empty passage is one training sentence.
      input_files: UTF-8 text files, one sentence per line.
      out_dir: created if missing.
      vocab_size: the exact number of pieces, special pieces included (ids 0..3: <unk> <s> </s> <pad>).
      model_type: "bpe" (default, as LLaMA), "unigram", "char" or "word".
      character_coverage: fraction of characters the vocabulary must cover; the rest fall back to bytes. LLaMA's
        0.99995: at 0.9995, 2.1% of the tokens of a held-out novel (西游记, tokenizer trained on 红楼梦 and
        三国演义) were bytes of characters the training text has; at 0.99995, 1.4%, nearly all of them characters
        it lacks (1.3% at 1.0).
      byte_fallback: encode characters outside the vocabulary as <0xNN> byte pieces instead of <unk>.
      split_digits: every digit is its own piece.
      user_defined_symbols: strings that are always exactly one piece, e.g. "<|im_start|>".
      max_sentence_length: lines longer than this many UTF-8 bytes are skipped (and counted in the log).
      input_sentence_size: sentencepiece trains on a random sample of at most this many lines.
      num_threads: training threads.
      seed: seeds sentencepiece's sampling of lines, so training is reproducible.

    Returns:
      The trained `Tokenizer`.
    """
    # Check the arguments before a long read of the corpus.
    if isinstance(texts, str):  # iterating a str would give one sentence per character
        raise TypeError("texts must be an iterable of documents, not one str; wrap it in a list")
    if texts is None and not input_files:
        raise ValueError("train_tokenizer needs texts, input_files or both")
    input_files = [os.fspath(p) for p in input_files]
    for p in input_files:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"tokenizer training input not found: {p!r}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; expected one of {MODEL_TYPES}")
    if vocab_size <= len(SPECIAL_PIECES):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_PIECES)} special pieces")

    if storage.is_remote(out_dir):   # sentencepiece writes local files: train in a temporary folder, upload both
        with tempfile.TemporaryDirectory(prefix="jaxllm-tokenizer-") as local:
            train_tokenizer(texts, input_files=input_files, out_dir=local, vocab_size=vocab_size, model_type=model_type,
                            character_coverage=character_coverage, byte_fallback=byte_fallback,
                            split_digits=split_digits, user_defined_symbols=user_defined_symbols,
                            max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
                            num_threads=num_threads, seed=seed)
            for name in (MODEL_FILENAME, Path(MODEL_FILENAME).stem + ".vocab"):
                storage.upload_file(Path(local) / name, storage.as_path(out_dir) / name)
        return Tokenizer(storage.as_path(out_dir) / MODEL_FILENAME)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = _Lines(texts, input_files, max_sentence_length)
    special = {f"{name}_{key}": value for name, (i, piece) in SPECIAL_PIECES.items()
               for key, value in (("id", i), ("piece", piece))}
    # sentencepiece's sampling uses a process-wide generator; seeding it makes the sample reproducible.
    spm.set_random_generator_seed(seed)
    t0 = time.monotonic()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(out / Path(MODEL_FILENAME).stem),  # writes tokenizer.model and tokenizer.vocab
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            split_digits=split_digits,
            user_defined_symbols=list(user_defined_symbols),
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            # Lossless text, as LLaMA: no NFKC, keep runs of spaces (code indentation) as learnable pieces.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            minloglevel=2,  # sentencepiece logs every step at INFO; keep errors only
            **special,
        )
    except RuntimeError as e:
        if lines.error is not None:  # our own iterator failed (bad file, wrong type): show that error
            raise lines.error
        if lines.kept == 0:
            raise ValueError(f"no training text in {_describe_inputs(texts, input_files)}: "
                             f"{lines.empty} empty lines, {lines.too_long} lines longer than "
                             f"max_sentence_length={max_sentence_length} bytes") from e
        clear = _clear_error(e, vocab_size, character_coverage)
        if clear is not None:
            raise clear from e
        raise RuntimeError(f"sentencepiece training on {_describe_inputs(texts, input_files)} failed: {e}") from e

    log.info("tokenizer: trained in %.1fs", time.monotonic() - t0)
    # Skipped lines are data lost on purpose; say how many, louder when text was dropped for length.
    log.log(logging.WARNING if lines.too_long else logging.INFO,
            "trained a %d-piece %s tokenizer in %s on %d lines; skipped %d lines longer than %d bytes "
            "and %d empty lines", vocab_size, model_type, out, lines.kept, lines.too_long,
            max_sentence_length, lines.empty)
    return Tokenizer(out / MODEL_FILENAME)
