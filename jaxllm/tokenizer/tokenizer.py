"""`Tokenizer`: a thin wrapper around one SentencePiece model file.

The wrapper holds the model's serialized bytes, not just its path, so that it pickles into Grain worker
processes (which may not see the same filesystem) and `save` writes a byte-identical copy into a
checkpoint or workdir even after the original file is gone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

MODEL_FILENAME = "tokenizer.model"  # the file name inside a checkpoint or tokenizer directory


def resolve_model_file(path: str | os.PathLike) -> Path:
    """`path` itself if it is a file, else `path/tokenizer.model`; FileNotFoundError naming what was tried."""
    p = Path(path)
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


class Tokenizer:
    """A SentencePiece model: text <-> token ids.

    `Tokenizer(path)` takes a `.model` file or a directory holding `tokenizer.model`. Special ids are what
    the model itself declares (-1 when it has none, e.g. LLaMA has no pad).
    """

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
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        target = out / MODEL_FILENAME
        target.write_bytes(self._proto)
        return str(target)
