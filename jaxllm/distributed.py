"""Multi-process runs: JAX's multi-controller runtime started from the environment, and what every process
must agree on (when to stop on pre-emption, how many evaluation batches to run).

One process per host; all processes run the same program over one global mesh. `initialize()` reads, in
order:
  1. explicit settings: arguments, or JAXLLM_COORDINATOR (host:port of process 0), JAXLLM_NUM_PROCESSES,
     JAXLLM_PROCESS_ID; under SLURM the last two default to SLURM_NTASKS / SLURM_PROCID, and the
     coordinator to the first host of the job's node list (launch/slurm_gpu.sh sets it explicitly);
  2. SLURM alone (SLURM_JOB_ID, SLURM_NTASKS > 1, SLURM_PROCID);
  3. TPU pods: JAXLLM_DISTRIBUTED=tpu (set by launch/tpu_pod.sh), or a GKE TPU environment naming several
     workers (TPU_WORKER_HOSTNAMES); JAX reads the slice's topology from the TPU metadata itself;
  4. otherwise one process: nothing to do.
JAXLLM_DISTRIBUTED=off skips all of this. On CPU (the multi-process tests) cross-process collectives use
gloo, which must be chosen before the backend starts; `initialize` does that.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal

import jax
import numpy as np

ENV_COORDINATOR = "JAXLLM_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLLM_PROCESS_ID"
ENV_MODE = "JAXLLM_DISTRIBUTED"          # "auto" (default) | "tpu" | "off"
DEFAULT_PORT = 12321


@dataclasses.dataclass(frozen=True)
class Topology:
    process_id: int
    num_processes: int
    coordinator: str | None   # None: one process, or chosen by JAX (TPU)
    source: str               # "single" | "explicit" | "slurm" | "tpu"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03' (what `scontrol show hostnames`
    prints first)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _slurm(env) -> dict | None:
    if not all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")):
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    port = int(env.get("JAXLLM_COORDINATOR_PORT", DEFAULT_PORT + int(env["SLURM_JOB_ID"]) % 20000))
    return {"num": int(env["SLURM_NTASKS"]), "id": int(env["SLURM_PROCID"]),
            "coordinator": f"{first_host(nodelist)}:{port}" if nodelist else None,
            "tasks_per_node": int(re.match(r"\d*", env.get("SLURM_NTASKS_PER_NODE")
                                           or env.get("SLURM_TASKS_PER_NODE", "1")).group() or 1),
            "local_id": int(env.get("SLURM_LOCALID", 0))}


def cluster_settings(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, env=None) -> tuple[Topology, list[int] | None]:
    """(topology, local device ids or None for all) from arguments and the environment; starts nothing."""
    env = os.environ if env is None else env
    mode = env.get(ENV_MODE, "auto")
    if mode not in ("auto", "tpu", "off"):
        raise ValueError(f"{ENV_MODE} must be auto, tpu or off, got {mode!r}")
    if mode == "off":
        return Topology(0, 1, None, "single"), None
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num = num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else env.get(ENV_PROCESS_ID)
    slurm = _slurm(env)
    explicit = any(v is not None for v in (coordinator, num, pid))
    if explicit or (slurm and slurm["num"] > 1):
        source = "explicit" if explicit else "slurm"
        if slurm:
            coordinator = coordinator or slurm["coordinator"]
            num = slurm["num"] if num is None else num
            pid = slurm["id"] if pid is None else pid
        missing = [name for name, v in ((ENV_COORDINATOR, coordinator), (ENV_NUM_PROCESSES, num),
                                        (ENV_PROCESS_ID, pid)) if v is None]
        if missing:
            raise ValueError(f"multi-process run: {', '.join(missing)} not set (give all of {ENV_COORDINATOR}, "
                             f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or run under SLURM)")
        num, pid = int(num), int(pid)
        if not 0 <= pid < num:
            raise ValueError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num})")
        # One process per node sees all the node's devices; one process per GPU sees its own.
        local = [slurm["local_id"]] if slurm and slurm["tasks_per_node"] > 1 else None
        return Topology(pid, num, coordinator, source), local
    gke_workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if mode == "tpu" or len(gke_workers) > 1:
        return Topology(-1, -1, None, "tpu"), None     # JAX reads the slice from the TPU environment
    return Topology(0, 1, None, "single"), None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Topology:
    """Starts JAX's distributed runtime when the environment describes several processes; a no-op on one.
    Must run before anything touches a JAX device."""
    if jax.distributed.is_initialized():
        return Topology(jax.process_index(), jax.process_count(), None, "already initialized")
    topo, local_devices = cluster_settings(coordinator, num_processes, process_id)
    if topo.source == "single" or topo.num_processes == 1:
        return topo
    # gloo: CPU collectives across processes (the default in jax 0.10, set for older releases and clarity);
    # it only matters to the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if topo.source == "tpu":
        jax.distributed.initialize()
        topo = Topology(jax.process_index(), jax.process_count(), None, "tpu")
    else:
        # cluster_detection_method="deactivate": our values are final (JAX's SLURM detection would otherwise
        # restrict a one-process-per-node job to a single GPU).
        jax.distributed.initialize(topo.coordinator, topo.num_processes, topo.process_id,
                                   local_device_ids=local_devices, cluster_detection_method="deactivate")
    logging.info("distributed: process %d of %d (%s, coordinator %s), %d local devices",
                 topo.process_id, topo.num_processes, topo.source, topo.coordinator, jax.local_device_count())
    return topo


def log_only_on_process_zero() -> None:
    """Process 0 logs progress; the others keep warnings and errors (each worker's log stays useful)."""
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)


class StopSignal:
    """Pre-emption (SIGTERM from a spot reclaim, a TPU maintenance event or SLURM) and Ctrl-C (SIGINT): save and
    stop, at the same step on every process. A second Ctrl-C stops at once, without saving.

    One process: Python handlers set a flag. Several processes: JAX's preemption sync manager (started by
    jax.distributed.initialize) catches SIGTERM on any process, tells the others, and all agree on one step;
    `reached(step)` must then be called by every process at every step. A Python SIGTERM handler is not
    installed then (it would replace the runtime's); Ctrl-C is turned into a SIGTERM to this process, so it
    goes the same way. Use as a context manager: leaving it puts back the handlers that were there before
    (a library caller's next stage must not inherit ours)."""

    def __init__(self):
        self.requested = False
        self.interrupted = False   # Ctrl-C asked to stop: the run ends with TrainingInterrupted, not success
        self._previous: dict = {}
        self._synced = (jax.process_count() > 1 and jax.distributed.is_initialized()
                        and jax.config.jax_enable_preemption_service)
        if jax.process_count() > 1 and not self._synced:
            logging.warning("the JAX preemption service is off: SIGTERM is handled per process, and processes "
                            "may stop at different steps")
        for sig in (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
                pass

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Puts back the handlers found at construction."""
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the nearest we can give.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                self.restore()
                raise KeyboardInterrupt("second Ctrl-C: stopped at once, without saving")
            self.interrupted = True
        logging.warning("%s received: saving a checkpoint and stopping%s", signal.Signals(signum).name,
                        " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else "")
        if self._synced and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)   # the preemption service tells every process
        else:
            self.requested = True

    def reached(self, step: int) -> bool:
        """True from the step at which this run saves and stops."""
        if self._synced and not self.requested:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("pre-emption notice: every process saves at step %d and stops", step)
                self.requested = True
        return self.requested


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array, on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's host rows (the same shape on each), concatenated in process order, on every process."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def same_count(batches: list[dict]) -> list[dict]:
    """Pads this process's batches with all-zero batches (loss_mask / weight 0: they add nothing to any sum)
    up to the largest count on any process, so every process runs the same number of collective steps."""
    if jax.process_count() == 1:
        return batches
    from jax.experimental import multihost_utils
    counts = np.asarray(multihost_utils.process_allgather(np.int32(len(batches))))
    most = int(counts.max())
    if most and not batches:
        raise ValueError(f"process {jax.process_index()} has no held-out batches while another has {most}: "
                         f"give more held-out data (data.eval_sources / data.eval_fraction)")
    zero = {k: np.zeros_like(v) for k, v in batches[0].items()} if batches else {}
    return list(batches) + [zero] * (most - len(batches))
