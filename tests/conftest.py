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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server (moto's) on 127.0.0.1, as a user points jaxllm at MinIO or any S3-compatible store:
    through the standard AWS_ENDPOINT_URL and credential variables, which boto3, s3fs and TensorStore read.
    Yields the endpoint URL; subprocesses started by a test inherit the variables."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
    """A fresh, empty bucket on the loopback S3 server; returns its URL, "s3://<name>"."""
    import boto3
    name = "jaxllm-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    name = name.strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session", autouse=True)
def _index_cache(tmp_path_factory):
    """Streaming sources cache their indexes per machine (~/.cache/jaxllm/indexes); the suite keeps its own."""
    saved = os.environ.get("JAXLLM_INDEX_DIR")
    os.environ["JAXLLM_INDEX_DIR"] = str(tmp_path_factory.mktemp("indexes"))
    yield
    if saved is None:
        os.environ.pop("JAXLLM_INDEX_DIR", None)
    else:
        os.environ["JAXLLM_INDEX_DIR"] = saved
