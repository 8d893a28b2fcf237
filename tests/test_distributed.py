"""Scale-out, tested on one machine without network: two processes on loopback (4 fake CPU devices each, gloo
collectives) train exactly like one process with 8 devices, even across a pre-emption: SIGTERM to one of them
makes both save the same step and exit cleanly, and the same command resumes. That checkpoint also restores
in one process on a different mesh, data position included. Plus: environment detection, re-splitting data
states, the launchers' dry runs and the memory plan."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxllm import distributed

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_args(corpus, tokenizer) -> list[str]:
    """One training command for every run here (the tiny model, 8 rows of 32 tokens per step)."""
    return ["--config=configs/pretrain.py:model=tiny", f"--config.data.sources={corpus}",
            f"--config.tokenizer={tokenizer}", "--config.data.seq_len=32", "--config.model.max_seq_len=32",
            "--config.train.batch_size=8", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.eval_batches=0", "--config.train.save_every=0",
            "--config.optim.warmup_steps=2"]


class _TwoProcessJob:
    """`jaxllm train` twice on loopback, as launch/slurm_gpu.sh would start it on two nodes."""

    def __init__(self, workdir: Path, args: list[str], env: dict):
        port = _free_port()
        self.logs = [workdir.parent / f"{workdir.name}-{i}.log" for i in range(2)]
        self.procs = []
        for i, log in enumerate(self.logs):
            penv = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                    "JAXLLM_COORDINATOR": f"127.0.0.1:{port}", "JAXLLM_NUM_PROCESSES": "2",
                    "JAXLLM_PROCESS_ID": str(i)}
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "jaxllm", "train", *args, f"--config.workdir={workdir}"],
                    cwd=REPO, env=penv, stdout=f, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            for p in self.procs:
                p.kill()
            pytest.fail("the two-process job timed out:\n" + self.tails())

    def tails(self) -> str:
        return "\n".join(f"--- process {i}\n" + log.read_text()[-2500:] for i, log in enumerate(self.logs))


@pytest.fixture(scope="module")
def scaleout(tmp_path_factory, english_corpus, tokenizer_path):
    """All the runs, once: (1) a two-process job, SIGTERM to process 1 mid-run; (2) its checkpoint copied
    aside; (3) the same command again, resuming; (4) in one 8-device process, the uninterrupted reference
    and the copied checkpoint trained on another mesh."""
    root = tmp_path_factory.mktemp("scaleout")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(root / "compile_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    args = _job_args(english_corpus, tokenizer_path)
    two, moved, ref = root / "two", root / "moved", root / "ref"
    timings = {}

    t = time.time()
    job = _TwoProcessJob(two, args, env)
    metrics = two / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in job.procs), job.tails()
        assert time.time() - t < 240, job.tails()
        time.sleep(0.1)
    job.procs[1].send_signal(signal.SIGTERM)        # one host pre-empted: the other must stop at the same step
    first_rc = job.wait()
    first_logs = [log.read_text() for log in job.logs]
    timings["sigterm_job"] = time.time() - t
    saved = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())

    if saved:   # (2) the pre-emption checkpoint, for the one-process restore on another mesh
        (moved / "checkpoints").mkdir(parents=True)
        shutil.copytree(two / "checkpoints" / str(saved[-1]), moved / "checkpoints" / str(saved[-1]))
        for name in ("config.json", "tokenizer.model"):
            shutil.copyfile(two / name, moved / name)
    step_dir = two / "checkpoints" / str(saved[-1]) if saved else None
    listing = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")) if step_dir else []

    t = time.time()
    job = _TwoProcessJob(two, args, env)            # (3) the same command: resumes
    second_rc = job.wait()
    second_logs = [log.read_text() for log in job.logs]
    timings["resumed_job"] = time.time() - t

    t = time.time()
    worker = subprocess.run([sys.executable, str(REPO / "tests" / "distributed_worker.py"), str(ref), str(moved),
                             str(two), json.dumps(args)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    timings["one_process_runs"] = time.time() - t
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
    return {"first_rc": first_rc, "first_logs": first_logs, "saved": saved, "listing": listing,
            "second_rc": second_rc, "second_logs": second_logs, "worker": worker,
            "two_losses": {r["step"]: r["train/loss"] for r in map(json.loads, metrics.read_text().splitlines())
                           if "train/loss" in r}}


def _worker_result(scaleout) -> dict:
    w = scaleout["worker"]
    assert w.returncode == 0, w.stderr[-4000:]
    out = json.loads(w.stdout.strip().splitlines()[-1])
    return {**out, "reference": {int(k): v for k, v in out["reference"].items()},
            "moved": {int(k): v for k, v in out["moved"].items()}}


def test_sigterm_to_one_process_saves_a_complete_checkpoint_on_both_and_the_same_command_resumes(scaleout):
    assert scaleout["first_rc"] == [0, 0], "\n".join(log[-2500:] for log in scaleout["first_logs"])
    saved = scaleout["saved"]
    assert saved and 3 <= saved[-1] < STEPS, saved
    step = saved[-1]
    for log in scaleout["first_logs"]:   # both processes agreed on the step (process 1 got the signal)
        assert f"every process saves at step {step} and stops" in log
    listing = scaleout["listing"]       # committed by Orbax, each process's data state included
    assert {"state", "data_per_process/process_0-of-2.json", "data_per_process/process_1-of-2.json"} <= set(listing)
    assert not any("tmp" in p for p in listing), listing
    assert scaleout["second_rc"] == [0, 0], "\n".join(log[-2500:] for log in scaleout["second_logs"])
    assert f"at step {step}" in scaleout["second_logs"][0] and "resumed from" in scaleout["second_logs"][0]
    assert sorted(scaleout["two_losses"]) == list(range(1, STEPS + 1))   # each step once, none lost or repeated


def test_two_processes_train_like_one_process_with_eight_devices(scaleout):
    """Losses of every step and the final parameters, across the pre-emption and resume."""
    result = _worker_result(scaleout)
    ref, two = result["reference"], scaleout["two_losses"]
    assert sorted(ref) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-5)
    assert result["two_process_vs_reference"] < 1e-5


def test_two_process_checkpoint_restores_in_one_process_on_another_mesh(scaleout):
    result = _worker_result(scaleout)
    step = scaleout["saved"][-1]
    assert "data state: re-split from 2 process(es) to 1" in scaleout["worker"].stderr
    assert result["moved_gate_shard"] == [2, 32, 96]        # (layers, embed / fsdp, mlp / tensor): really resharded
    moved, ref = result["moved"], result["reference"]
    assert sorted(moved) == list(range(step + 1, STEPS + 1))
    np.testing.assert_allclose([moved[s] for s in sorted(moved)], [ref[s] for s in sorted(moved)], rtol=1e-5)
    assert result["moved_vs_reference"] < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Without processes: the environment, data states, launchers, memory plan.

def test_initialize_reads_explicit_settings_slurm_and_tpu_from_the_environment():
    assert distributed.cluster_settings(env={})[0].source == "single"
    topo, local = distributed.cluster_settings(env={"JAXLLM_COORDINATOR": "10.0.0.1:1234", "JAXLLM_NUM_PROCESSES": "4",
                                           "JAXLLM_PROCESS_ID": "3"})
    assert (topo.coordinator, topo.num_processes, topo.process_id, topo.source, local) == \
        ("10.0.0.1:1234", 4, 3, "explicit", None)
    with pytest.raises(ValueError, match="JAXLLM_PROCESS_ID not set"):
        distributed.cluster_settings(env={"JAXLLM_COORDINATOR": "h:1", "JAXLLM_NUM_PROCESSES": "2"})
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "gpu[03-05,09]", "SLURM_TASKS_PER_NODE": "1(x4)"}
    topo, local = distributed.cluster_settings(env=slurm)
    assert (topo.coordinator, topo.num_processes, topo.process_id, topo.source, local) == \
        (f"gpu03:{12321 + 4242}", 4, 2, "slurm", None)     # one process per node: all its GPUs
    topo, local = distributed.cluster_settings(env={**slurm, "SLURM_NTASKS": "16", "SLURM_TASKS_PER_NODE": "4(x4)",
                                           "SLURM_LOCALID": "1", "JAXLLM_COORDINATOR": "gpu03:9999"})
    assert (topo.coordinator, local) == ("gpu03:9999", [1])  # one process per GPU: its own
    assert distributed.cluster_settings(env={**slurm, "SLURM_NTASKS": "1"})[0].source == "single"
    assert distributed.cluster_settings(env={**slurm, "JAXLLM_DISTRIBUTED": "off"})[0].source == "single"
    assert distributed.cluster_settings(env={"JAXLLM_DISTRIBUTED": "tpu"})[0].source == "tpu"
    assert distributed.first_host("node7") == "node7" and distributed.first_host("a[1,3],b2") == "a1"


def test_data_state_of_two_processes_resplits_into_one_exactly(english_corpus, tokenizer_path):
    """The lanes of two processes' iterators, re-split into one, continue with exactly the next global batch."""
    from jaxllm.data.mixture import DataStateMismatchError, resplit_data_state
    from jaxllm.data import lm_pipeline
    from jaxllm.tokenizer import Tokenizer
    docs = english_corpus.read_text().splitlines()[:300]
    tok = Tokenizer(tokenizer_path)

    def pipe(batch, index, count):
        return lm_pipeline(docs, tok, seq_len=32, batch_size=batch, seed=3, process_index=index,
                           process_count=count)
    halves = [pipe(4, i, 2) for i in range(2)]
    for _ in range(3):
        for it in halves:
            next(it)
    saved = {i: json.loads(json.dumps(it.get_state())) for i, it in enumerate(halves)}
    whole = pipe(8, 0, 1)
    whole.set_state(resplit_data_state(saved, whole.get_state(), process_count=1))
    expected = [next(it) for it in halves]
    got = next(whole)
    for key in got:
        np.testing.assert_array_equal(got[key], np.concatenate([e[key] for e in expected]), err_msg=key)
    with pytest.raises(DataStateMismatchError, match="global batch size"):
        resplit_data_state(saved, pipe(16, 0, 1).get_state(), process_count=1)
    with pytest.raises(DataStateMismatchError, match="cannot re-split"):
        resplit_data_state({0: {"parent": {}}, 1: {"parent": {}}}, {"parent": {}}, process_count=1)


def test_each_process_data_state_is_saved_and_older_single_state_checkpoints_still_restore(tmp_path):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jaxllm.checkpoint import RunCheckpointer
    state = {"w": jnp.arange(4.0)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    ckpt = RunCheckpointer(str(tmp_path), async_save=False)
    ckpt.save(2, state, {"pos": 9})
    ckpt.wait()
    assert json.loads((tmp_path / "checkpoints/2/data_per_process/process_0-of-1.json").read_text()) == {"pos": 9}
    assert ckpt.restore(2, abstract)[1] == {"pos": 9}
    # The layout before per-process states: one "data" item written by process 0.
    ckpt.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=ocp.args.JsonSave({"pos": 11})), force=True)
    ckpt.wait()
    restored, data = ckpt.restore(3, abstract)
    assert data == {"pos": 11} and np.array_equal(restored["w"], state["w"])
    ckpt.close()


def _launcher(name: str, *args: str, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", str(REPO / "launch" / name), *args], capture_output=True, text=True, timeout=60,
                         env=env or os.environ)
    assert out.returncode == 0, out.stderr
    return out


def test_tpu_pod_dry_run_prints_install_run_and_stop_on_every_worker(tmp_path):
    out = _launcher("tpu_pod.sh", "--tpu=my-pod", "--zone=us-east5-a", "--project=proj", f"--logdir={tmp_path}",
                    "--dry_run", "--", "configs/pretrain.py:model=llama2-7b", "--config.workdir=/mnt/shared/run",
                    "--config.mesh.fsdp=32").stdout
    where = "--zone=us-east5-a --project=proj --worker=all"
    assert "+ gcloud compute tpus tpu-vm scp " in out
    assert f"jaxllm-src-my-pod.tar.gz my-pod:jaxllm-src.tar.gz {where}" in out
    assert f"gcloud compute tpus tpu-vm ssh my-pod {where} '--command=mkdir -p ~/jaxllm && tar -xzf" in out
    assert 'pip install -q -e ".[tpu]"' in out
    run = next(line for line in out.splitlines() if "--output-directory" in line)
    assert run.startswith(f"+ gcloud compute tpus tpu-vm ssh my-pod {where} --output-directory={tmp_path} ")
    assert ("JAXLLM_DISTRIBUTED=tpu .venv/bin/python -m jaxllm train --config=configs/pretrain.py:model=llama2-7b "
            "--config.workdir=/mnt/shared/run --config.mesh.fsdp=32 &") in run
    assert "exit code $rc" in run
    assert "kill -TERM $pid" in out and "kill -KILL $pid" in out      # stop all workers on failure
    assert not any(tmp_path.iterdir())                                  # a dry run starts nothing


def test_slurm_dry_run_takes_the_coordinator_from_the_node_list(tmp_path):
    (tmp_path / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[03-05,09]" ] || exit 1\n'
                                       'printf "gpu03\\ngpu04\\ngpu05\\ngpu09\\n"\n')
    (tmp_path / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[03-05,09]", "SLURM_JOB_NUM_NODES": "4"}
    out = _launcher("slurm_gpu.sh", "--dry_run", f"--logdir={tmp_path}", "--",
                    "configs/pretrain.py:model=llama2-7b", "--config.workdir=/shared/run", env=env).stdout
    assert "coordinator gpu03:16563" in out
    assert ("+ srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --label env "
            "JAXLLM_COORDINATOR=gpu03:16563 JAXLLM_NUM_PROCESSES=4 ") in out
    assert "-m jaxllm train --config=configs/pretrain.py:model=llama2-7b --config.workdir=/shared/run" in out
    assert f"tee -a {tmp_path}/slurm-4242.log" in out
    out = subprocess.run(["bash", str(REPO / "launch" / "slurm_gpu.sh"), "--", "configs/pretrain.py"],
                         capture_output=True, text=True, env={k: v for k, v in env.items() if k != "SLURM_JOB_ID"})
    assert out.returncode == 2 and "not inside a SLURM allocation" in out.stderr


def test_launchers_take_a_bucket_workdir_and_say_what_every_host_reads_and_writes(tmp_path):
    """A gs:// workdir on a TPU pod: the workers get the [cloud] extra and no shared mount is asked for; an s3://
    workdir under SLURM: the same plan, with the S3 endpoint's variables named. Neither dry run starts anything."""
    out = _launcher("tpu_pod.sh", "--tpu=my-pod", "--zone=us-east5-a", f"--logdir={tmp_path}", "--dry_run", "--",
                    "pretrain:model=llama2-7b", "--config.workdir=gs://bkt/run",
                    "--config.data.sources=gs://bkt/prepared/web").stdout
    assert 'pip install -q -e ".[tpu,cloud]"' in out
    assert "workdir gs://bkt/run: an object store every host writes directly" in out
    assert "every host reads:  gs://bkt/prepared/web\n" in out and "copied once into each host's" in out
    assert "every host writes: gs://bkt/run/checkpoints/<step>/state/ocdbt.process_<i>/ (its own array shards)" in out
    assert "gs://bkt/run/metrics.jsonl (rewritten whole every 30 s and before each checkpoint)" in out
    assert "VM's service account" in out and not any(tmp_path.iterdir())

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text('#!/bin/sh\nprintf "gpu01\\ngpu02\\n"\n')
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2"}
    out = _launcher("slurm_gpu.sh", "--dry_run", f"--logdir={tmp_path}", "--", "pretrain",
                    "--config.workdir=s3://bkt/run", env=env).stdout
    assert "storage (2 node(s), one process each):" in out
    assert "workdir s3://bkt/run: an object store every host writes directly" in out
    assert "s3://bkt/run/checkpoints/<step>/data_per_process/process_<i>-of-<n>.json" in out
    assert "AWS_ENDPOINT_URL and AWS_REGION name an S3-compatible store" in out
    out = _launcher("slurm_gpu.sh", "--dry_run", f"--logdir={tmp_path}", "--", "pretrain",
                    "--config.workdir=/shared/run", env=env).stdout
    assert "workdir /shared/run: must be one filesystem that every host mounts" in out


def test_memory_plan_of_llama2_7b_on_64_devices_is_the_sharded_share(capsys):
    from jaxllm import plan_memory
    from jaxllm.cli import load_config
    cfg = load_config(["--config=configs/pretrain.py:model=llama2-7b", "--config.model.vocab_size=32000",
                       "--config.mesh.fsdp=64", "--config.workdir=unused"])
    p = plan_memory.plan(cfg, chip="v5p")
    assert p["parameters"] == 6_738_415_616 and p["devices"] == 64
    assert p["params"] == 6_738_415_616 * 4 // 64                      # fp32, every weight split 64 ways
    assert 2 * p["params"] <= p["opt_state"] < 2 * p["params"] + 64    # Adam's two moments, plus counters
    assert p["grads"] == p["params"] and p["tokens_per_device"] == 256 * 2048 / 64
    from jaxllm import plan_memory_cli
    assert plan_memory_cli.main(["--config=configs/pretrain.py:model=llama2-7b", "--config.model.vocab_size=32000",
                                 "--config.mesh.fsdp=8", "--chip=h100"]) == 0
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "WARNING: this run does not fit a h100" in captured.err


def test_memory_plan_matches_the_compiled_step_on_this_backend():
    """The state and batch bytes are exactly XLA's argument bytes; the activation estimate is within 2x."""
    from jaxllm import plan_memory
    from jaxllm.cli import load_config
    cfg = load_config(["--config=configs/pretrain.py:model=tiny", "--config.model.vocab_size=512",
                       "--config.data.seq_len=128", "--config.model.max_seq_len=128", "--config.train.batch_size=16",
                       "--config.workdir=unused"])
    p = plan_memory.plan(cfg, devices=1)
    compiled = plan_memory.compiled_memory(cfg)
    assert compiled["argument"] == p["params"] + p["opt_state"] + p["batch"]
    assert 0.5 < compiled["peak"] / p["total"] < 2, (compiled, p)
