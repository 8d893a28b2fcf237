"""Where run outputs live: a local folder, or an object store (`gs://`, `s3://`) through etils.epath, the path
layer Orbax already uses (with gcsfs / s3fs installed: `pip install 'jaxllm[cloud]'`).

    local path ──▶ pathlib.Path: the files and the atomic renames of before, unchanged
    gs://, s3:// ──▶ epath.Path: objects are written whole (one PUT: a reader sees the old object or the new one,
                    never half); there is no append and no directory rename, so appending rewrites the object

S3-compatible stores (MinIO, Ceph, moto) are found the standard way: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_REGION, read by s3fs (botocore) and, for checkpoint arrays, by `orbax_s3`.

Orbax (0.12) writes `gs://` through TensorStore's gcs driver but gives `s3://` paths to its local-file driver,
which refuses them ("Checkpoint path should be absolute"); TensorStore's own s3 driver works, given the endpoint
in its spec (it does not read AWS_ENDPOINT_URL: without an endpoint it asks AWS for the bucket's region).
`orbax_s3` routes Orbax's s3:// array specs to that driver, and `checkpoint_atomicity` makes Orbax mark finished
steps with commit_success.txt where an object store has no atomic directory rename.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from etils import epath

log = logging.getLogger(__name__)

COMMIT_FILE = "commit_success.txt"   # Orbax's mark of a finished step where it cannot rename (object stores)


def is_remote(path) -> bool:
    """Whether `path` names an object store (`gs://bucket/...`, `s3://bucket/...`, any `<scheme>://`)."""
    return "://" in os.fspath(path) if isinstance(path, (str, os.PathLike)) else False


def as_path(path) -> Path | epath.Path:
    """pathlib.Path for a local path (its behaviour exactly as before), epath.Path for an object store URL."""
    return epath.Path(os.fspath(path)) if is_remote(path) else Path(path)


def absolute(path) -> Path | epath.Path:
    """The path made absolute where that means something (a local one); a URL is already absolute."""
    return as_path(path) if is_remote(path) else Path(path).absolute()


def write_bytes(path, data: bytes) -> None:
    """Writes a whole file atomically: locally through a temporary file and a rename; on an object store one PUT,
    which is atomic already. Parent folders are created."""
    p = as_path(path)
    if is_remote(p):
        p.write_bytes(data)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path, text: str) -> None:
    """Appends to a file; an object store has no append, so the object is read and written again whole (for small,
    rarely appended files: eval samples, reward histories)."""
    p = as_path(path)
    if not is_remote(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a", encoding="utf-8") as f:
            f.write(text)
        return
    before = p.read_text(encoding="utf-8") if p.exists() else ""
    p.write_text(before + text, encoding="utf-8")


def same_bytes(a, b) -> bool:
    """Whether two files (local or remote) hold the same bytes; False when either is missing."""
    pa, pb = as_path(a), as_path(b)
    if not (pa.is_file() and pb.is_file()):
        return False
    return pa.read_bytes() == pb.read_bytes()


def same_file(a, b) -> bool:
    """Whether two paths name one file (a local path resolved; URLs compared as written)."""
    if is_remote(a) or is_remote(b):
        return os.fspath(a).rstrip("/") == os.fspath(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def upload_file(local: str | Path, remote) -> None:
    """Copies one local file to `remote` (an object written whole)."""
    as_path(remote).write_bytes(Path(local).read_bytes())


def move_tree(src, dst) -> None:
    """Moves a folder: a rename locally; on an object store, where folders are key prefixes and cannot be renamed,
    each object is copied and the source removed after every copy landed."""
    s, d = as_path(src), as_path(dst)
    if not is_remote(s) and not is_remote(d):
        import shutil
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(s), str(d))
        return
    for f in walk_files(s):
        target = d / os.fspath(f)[len(os.fspath(s).rstrip("/")) + 1:]
        if not is_remote(target):
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    s.rmtree()


def walk_files(root) -> list:
    """Every file under `root`, sorted (epath refuses `**` globs on object stores, so this walks level by level)."""
    root, out, todo = as_path(root), [], [as_path(root)]
    while todo:
        for child in sorted(todo.pop().iterdir(), key=str):
            (todo if child.is_dir() else out).append(child)
    return sorted(out, key=str)


def local_cache_dir(remote, kind: str) -> Path:
    """A per-machine folder for local copies of `remote` (JAXLLM_CACHE, else ~/.cache/jaxllm), named by a hash of
    the URL, e.g. <cache>/prepared/<hash>."""
    base = Path(os.environ.get("JAXLLM_CACHE") or Path.home() / ".cache" / "jaxllm")
    digest = hashlib.sha256(os.fspath(remote).rstrip("/").encode()).hexdigest()[:16]
    return base / kind / digest


def fetch_files(remote_dir, names: list[str], local_dir: Path, sizes: dict[str, int] | None = None) -> Path:
    """Local copies of remote_dir/<name> in local_dir, for readers that open local files only (ArrayRecord's C++
    reader). A copy whose size matches `sizes` is kept, so a second run on the machine downloads nothing."""
    local_dir.mkdir(parents=True, exist_ok=True)
    remote = as_path(remote_dir)
    fetched = 0
    for name in names:
        target = local_dir / name
        if sizes and target.is_file() and target.stat().st_size == sizes.get(name):
            continue
        data = (remote / name).read_bytes()
        fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        fetched += len(data)
    if fetched:
        log.info("copied %.1f MB of %s to %s (a local reader needs local files)", fetched / 1e6, remote_dir, local_dir)
    return local_dir


# ----------------------------------------------------------------------------------------------------
# Orbax checkpoints on object stores.

def checkpoint_atomicity(directory):
    """Orbax's atomicity options for a checkpoint directory: on an object store a step is written in place and
    marked finished by commit_success.txt (there is no atomic rename of a folder of objects); locally None, Orbax's
    default (write under a temporary name, rename when complete)."""
    if not is_remote(directory):
        return None
    import orbax.checkpoint as ocp
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


def s3_kvstore(bucket: str, path: str) -> dict:
    """TensorStore's s3 kvstore spec for s3://bucket/path, pointed where boto3 and s3fs point: AWS_ENDPOINT_URL
    (MinIO, any S3-compatible store) and AWS_REGION / AWS_DEFAULT_REGION."""
    spec = {"driver": "s3", "bucket": bucket, "path": path}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        spec["endpoint"] = endpoint
        spec["aws_region"] = region or "us-east-1"   # signatures need one; S3-compatible stores accept any
    elif region:
        spec["aws_region"] = region
    return spec


def _gcs_to_s3(node):
    """An Orbax kvstore spec built for gs:// with every gcs driver replaced by s3 on the same bucket and path."""
    if isinstance(node, dict):
        if node.get("driver") in ("gcs", "gcs_grpc"):
            extra = {k: v for k, v in node.items() if k not in ("driver", "bucket", "path")}
            return {**extra, **s3_kvstore(node["bucket"], node.get("path", ""))}
        return {k: _gcs_to_s3(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_gcs_to_s3(v) for v in node]
    if isinstance(node, str) and node.startswith("gs://"):
        bucket, _, path = node[len("gs://"):].partition("/")
        return s3_kvstore(bucket, path)
    return node


@functools.cache
def orbax_s3() -> None:
    """Lets Orbax write and read checkpoint arrays under s3:// through TensorStore's s3 driver: its kvstore spec is
    built as for gs:// (the remote layout: OCDBT per process, no local-file assumptions) and the gcs driver is
    swapped for s3. Installed once, only when a checkpoint path is s3://; local and gs:// specs pass through."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    build = ts_utils.build_kvstore_tspec
    if getattr(build, "jaxllm_s3", False):
        return

    def build_kvstore_tspec(directory, *args, **kwargs):
        d = os.fspath(directory)
        if d.startswith("s3://"):
            return _gcs_to_s3(build("gs://" + d[len("s3://"):], *args, **kwargs))
        return build(directory, *args, **kwargs)

    build_kvstore_tspec.jaxllm_s3 = True
    ts_utils.build_kvstore_tspec = build_kvstore_tspec


def prepare_checkpoint_path(directory) -> None:
    """What a checkpoint path needs before Orbax opens it: the s3 route for s3:// (see `orbax_s3`)."""
    if os.fspath(directory).startswith("s3://"):
        orbax_s3()
