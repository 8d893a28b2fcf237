"""`Tokenizer` (one SentencePiece model file) and `HFTokenizer` (a Hugging Face tokenizer.json), one interface;
`load_tokenizer` takes either, or a folder holding one.

The wrapper holds the model's serialized bytes, not just its path, so that it pickles into Grain worker
processes (which may not see the same filesystem) and `save` writes a byte-identical copy into a
checkpoint or workdir even after the original file is gone.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from jaxllm.storage import as_path

MODEL_FILENAME = "tokenizer.model"  # the file name inside a checkpoint or tokenizer directory
HF_FILENAME = "tokenizer.json"      # a Hugging Face fast tokenizer's file


def resolve_model_file(path: str | os.PathLike) -> Path:
    """`path` itself if it is a file, else `path/tokenizer.model`; FileNotFoundError naming what was tried."""
    p = as_path(path)
    if p.is_dir():
        p = p / MODEL_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {str(p)!r} (expected a .model file or a "
                                f"directory containing {MODEL_FILENAME!r})")
    return p


def not_a_model_error(path: str | os.PathLike, data: bytes, role: str = "") -> ValueError:
    """The error for a file sentencepiece cannot load, naming it and what it seems to be instead of sentencepiece's
    raw protobuf check ("INTERNAL: ... ParseFromArray ...")."""
    what = f"{role} {str(path)!r}" if role else repr(str(path))
    if not data:
        found = "the file is empty"
    elif data.lstrip()[:1] in (b"{", b"["):
        found = "it is JSON: a Hugging Face tokenizer.json? jaxllm reads SentencePiece .model files"
    else:
        found = f"{len(data)} bytes that do not parse as a SentencePiece model: truncated, or another format?"
    return ValueError(f"{what} is not a SentencePiece model ({found}); expected a .model file written by "
                      f"sentencepiece, e.g. LLaMA's tokenizer.model")


class _SpecialTokens:
    """`token_id`, shared by both tokenizers over their `special_tokens`."""

    def token_id(self, text: str) -> int:
        """The id of one special token by its text ("<|im_end|>", "</s>"); KeyError naming the tokenizer if it
        has no such token (a chat marker the template needs but the vocabulary lacks)."""
        tid = self.special_tokens.get(text)
        if tid is None:
            names = sorted(self.special_tokens)
            raise KeyError(f"{text!r} is not a special token of {self.path!r} (its {len(names)} special tokens "
                           f"include {names[:12]})")
        return tid


class Tokenizer(_SpecialTokens):
    """A SentencePiece model: text <-> token ids.

    `Tokenizer(path)` takes a `.model` file or a directory holding `tokenizer.model`. Special ids are what
    the model itself declares (-1 when it has none, e.g. LLaMA has no pad).
    """

    filename = MODEL_FILENAME

    def __init__(self, path: str | os.PathLike):
        model_file = resolve_model_file(path)
        try:
            proto = model_file.read_bytes()
        except OSError as e:
            raise OSError(f"cannot read SentencePiece model {str(model_file)!r}: {e}") from e
        self._load(str(model_file), proto)

    def _load(self, path: str, proto: bytes) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except RuntimeError:  # sentencepiece's message is a bare C++ check; say which file it was, and why
            raise not_a_model_error(path, proto) from None
        self._path, self._proto, self._sp = path, proto, sp

    # Pickling: keep the model bytes, not the C++ processor (which cannot be pickled portably).
    def __getstate__(self) -> dict:
        return {"path": self._path, "model_proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._load(state["path"], state["model_proto"])

    def __repr__(self) -> str:
        return f"Tokenizer({self._path!r}, vocab_size={self.vocab_size})"

    # --- properties --------------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The model file this tokenizer was loaded from."""
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @functools.cached_property
    def special_tokens(self) -> dict[str, int]:
        """Control pieces (<s>, </s>), <unk> and user-defined symbols (always one piece in text, e.g. a chat
        marker given to training as user_defined_symbols) -> id. Control pieces written in text are not one id
        (sentencepiece splits "</s>" as text); chat templates encode bos/eos texts through their ids instead."""
        from jaxllm.tokenizer.proto import model_proto_class
        kinds = {2, 3, 4}   # SentencePiece.Type UNKNOWN, CONTROL, USER_DEFINED
        return {p.piece: i for i, p in enumerate(model_proto_class().FromString(self._proto).pieces) if p.type in kinds}

    # --- encoding ------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of one string."""
        # sentencepiece silently switches to batch mode on a list; a wrong type should fail, not change shape.
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use encode_batch for many texts")
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
                     ) -> list[list[int]]:
        """Token ids of many strings, encoded by sentencepiece's multi-threaded batch encoder."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: texts[{i}] is {type(t).__name__}, not str")
        return self._sp.encode(texts, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special pieces such as bos/eos decode to nothing)."""
        ids = [int(i) for i in ids]  # also accepts numpy arrays and numpy integers
        for i in ids:
            self._check_id(i)
        return self._sp.decode(ids)

    def id_to_piece(self, id: int) -> str:
        self._check_id(int(id))
        return self._sp.id_to_piece(int(id))

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or `unk_id` when the piece is not in the vocabulary (as sentencepiece does)."""
        return self._sp.piece_to_id(piece)

    def _check_id(self, i: int) -> None:
        # sentencepiece only says "piece id is out of range"; name the id and the valid range.
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is out of range for {self._path!r} "
                             f"(vocab_size {self.vocab_size}, valid ids 0..{self.vocab_size - 1})")

    # --- saving --------------------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> str:
        """Writes the model, byte for byte, as `out_dir/tokenizer.model`; returns that path."""
        out = as_path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        target = out / MODEL_FILENAME
        target.write_bytes(self._proto)
        return str(target)


class HFTokenizer(_SpecialTokens):
    """A Hugging Face `tokenizer.json` (Qwen, Llama 3, minimind, ...) through the `tokenizers` library, with the
    interface of `Tokenizer`. bos/eos/pad come from the `tokenizer_config.json` beside it (the tokens it names;
    -1 when absent). Special tokens written in text (a chat template's "<|im_end|>") encode as their one id.
    Holds the JSON text, so it pickles into Grain workers and saves byte-identical copies."""

    filename = HF_FILENAME

    def __init__(self, path: str | os.PathLike):
        path = as_path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise OSError(f"cannot read tokenizer {str(path)!r}: {e}") from e
        config_file = path.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self._load(str(path), text, config)

    def _load(self, path: str, text: str, config: dict) -> None:
        from tokenizers import Tokenizer as Backend
        try:
            self._tok = Backend.from_str(text)
        except Exception as e:   # tokenizers raises a bare Exception with serde's message
            raise ValueError(f"{path!r} is not a Hugging Face tokenizer.json ({e})") from None
        self._path, self._text, self._config = path, text, config

        def named(key):   # "<|endoftext|>" or {"content": "<|endoftext|>", ...}
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            tid = self._tok.token_to_id(token) if token else None
            return -1 if tid is None else tid

        self._ids = {k: named(f"{k}_token") for k in ("bos", "eos", "pad", "unk")}
        if self._ids["unk"] < 0 and getattr(self._tok.model, "unk_token", None):
            self._ids["unk"] = self._tok.token_to_id(self._tok.model.unk_token) or -1

    def __getstate__(self) -> dict:
        return {"path": self._path, "text": self._text, "config": self._config}

    def __setstate__(self, state: dict) -> None:
        self._load(state["path"], state["text"], state["config"])

    def __repr__(self) -> str:
        return f"HFTokenizer({self._path!r}, vocab_size={self.vocab_size})"

    path = property(lambda self: self._path)
    vocab_size = property(lambda self: self._tok.get_vocab_size(with_added_tokens=True))
    bos_id = property(lambda self: self._ids["bos"])
    eos_id = property(lambda self: self._ids["eos"])
    pad_id = property(lambda self: self._ids["pad"])
    unk_id = property(lambda self: self._ids["unk"])

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special added token (e.g. <|im_start|>, <|im_end|>, <|endoftext|>) -> its id."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use encode_batch for many texts")
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: texts[{i}] is {type(t).__name__}, not str")
        return [self._wrap(e.ids, add_bos, add_eos) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return [self.bos_id] * (add_bos and self.bos_id >= 0) + ids + [self.eos_id] * (add_eos and self.eos_id >= 0)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special tokens decode to nothing, as bos/eos do with SentencePiece."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for {self._path!r} (vocab_size {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, id: int) -> str:
        return self._tok.id_to_token(int(id))

    def piece_to_id(self, piece: str) -> int:
        tid = self._tok.token_to_id(piece)
        return self.unk_id if tid is None else tid

    def save(self, out_dir: str | os.PathLike) -> str:
        """Writes tokenizer.json (and the tokenizer_config.json that names its special tokens); returns the path."""
        out = as_path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / HF_FILENAME).write_text(self._text, encoding="utf-8")
        if self._config:
            (out / "tokenizer_config.json").write_text(json.dumps(self._config, indent=2, ensure_ascii=False))
        return str(out / HF_FILENAME)


def find_tokenizer_file(directory: str | os.PathLike) -> str | None:
    """The tokenizer file of a checkpoint, run or model folder: tokenizer.model (SentencePiece, exact) if present,
    else tokenizer.json; None when it has neither."""
    for name in (MODEL_FILENAME, HF_FILENAME):
        if (as_path(directory) / name).is_file():
            return str(as_path(directory) / name)
    return None


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The tokenizer file `path` names: itself, or the one in a folder (tokenizer.model first, as SentencePiece is
    the exact reference where a folder has both); FileNotFoundError naming what was tried."""
    p = as_path(path)
    if p.is_dir():
        found = find_tokenizer_file(p)
        if found is None:
            raise FileNotFoundError(f"{str(p)!r} holds no tokenizer ({MODEL_FILENAME} or {HF_FILENAME})")
        p = as_path(found)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {str(p)!r} (expected a SentencePiece .model, a Hugging Face "
                                f"tokenizer.json, or a directory holding one)")
    return p


def is_tokenizer_json(path: str | os.PathLike) -> bool:
    """Whether `path` (a file or folder) is a Hugging Face tokenizer.json, decided without loading it."""
    return tokenizer_file(path).suffix == ".json"


def load_tokenizer(path: str | os.PathLike) -> "Tokenizer | HFTokenizer":
    """A SentencePiece `.model`, a Hugging Face `tokenizer.json`, or a folder holding either (see `tokenizer_file`)
    -> a tokenizer with one interface."""
    if isinstance(path, (Tokenizer, HFTokenizer)):
        return path
    p = tokenizer_file(path)
    return HFTokenizer(p) if p.suffix == ".json" else Tokenizer(p)
