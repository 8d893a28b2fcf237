"""Shared test fixtures. Tests run on the CPU with tiny models; shared/data is optional."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (developer and CI machines have it beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def english_corpus(tmp_path_factory) -> Path:
    """A small real English corpus, one paragraph per line, from Python's own documentation (pydoc_data)."""
    from pydoc_data.topics import topics
    paragraphs = [p.replace("\n", " ").strip() for text in topics.values() for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p) > 40][:1500]
    path = tmp_path_factory.mktemp("corpus") / "pydoc.txt"
    path.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_path(english_corpus, tmp_path_factory) -> str:
    from jaxllm.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(input_files=[str(english_corpus)], out_dir=str(out), vocab_size=512).path
