"""Checkpoint save and restore time: a local workdir against an S3 workdir on a loopback S3 server (moto's), the
same RunCheckpointer and state. What the object-store path costs in requests and copies, not network speed.

    python benchmarks/object_store.py --mb=64 --repeats=3

Needs the [cloud] and [test] extras (s3fs, moto[server]). Everything it writes is deleted after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_REGION": "us-east-1"})
    import boto3
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-ckpt")
    return server, "s3://bench-ckpt"


def time_save_restore(workdir: str, state: dict, repeats: int) -> tuple[float, float]:
    import jax
    from jaxllm.checkpoint import RunCheckpointer
    saves, restores = [], []
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    for r in range(repeats):
        ckpt = RunCheckpointer(workdir, keep=2, async_save=False)
        t0 = time.perf_counter()
        ckpt.save(r + 1, state, {"position": r})
        ckpt.wait()
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        restored, data = ckpt.restore(r + 1, abstract)
        jax.block_until_ready(restored)
        restores.append(time.perf_counter() - t0)
        assert data == {"position": r}
        np.testing.assert_array_equal(np.asarray(restored["w0"]), np.asarray(state["w0"]))
        ckpt.close()
    return statistics.median(saves), statistics.median(restores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=64, help="state size in MB (float32 arrays of 4 MB)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import jax.numpy as jnp
    n = max(args.mb // 4, 1)
    state = {f"w{i}": jnp.full((1024, 1024), float(i), jnp.float32) for i in range(n)}
    server, bucket = start_s3()
    try:
        with tempfile.TemporaryDirectory() as local:
            rows = {"local disk": time_save_restore(local, state, args.repeats),
                    "loopback S3 (moto)": time_save_restore(f"{bucket}/run", state, args.repeats)}
    finally:
        server.stop()
    print(f"state {4 * n} MB in {n} arrays, median of {args.repeats}")
    print(f"{'workdir':<20} {'save s':>8} {'restore s':>10} {'save MB/s':>10}")
    for name, (save, restore) in rows.items():
        print(f"{name:<20} {save:8.2f} {restore:10.2f} {4 * n / save:10.1f}")


if __name__ == "__main__":
    main()
