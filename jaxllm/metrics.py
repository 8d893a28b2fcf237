"""Where metrics go: metrics.jsonl, TensorBoard, optionally Weights & Biases, a console progress line, and PNG
plots; plus MFU."""
from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import jax

from jaxllm import storage

# Dense bf16 peak per chip, TFLOP/s (vendor datasheets). Used for MFU when train.peak_tflops is 0.
_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "v5e": 197.0, "v5 lite": 197.0, "v5p": 459.0,
                "v4": 275.0, "v6": 918.0, "l4": 121.0, "a10": 125.0}


def device_peak_tflops(device: jax.Device | None = None) -> float:
    """Best-known peak for the device kind; 0 when unknown (CPU), which turns MFU off."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, tflops in _PEAK_TFLOPS.items():
        if name in kind:
            return tflops
    return 0.0


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (PaLM, appendix B)."""
    if peak_tflops <= 0:
        return float("nan")
    return tokens_per_s * flops_per_token / (num_devices * peak_tflops * 1e12)


def interval_throughput(*, steps: int, batch_tokens: int, passes: int, flops_per_token: float, side_flops: float,
                        side_seconds: float, elapsed: float, num_devices: int, peak_tflops: float) -> dict:
    """Throughput of `steps` train steps that took `elapsed` seconds in all, each running `passes` forward and
    backward passes over a batch of `batch_tokens` (RL: rl.epochs passes over its rollouts), with `side_flops`
    model FLOPs done outside the train step in `side_seconds` of that time (RL: generation and the log-prob
    passes; 0 otherwise).
      tokens_per_s: the tokens the train step ran over, every pass counted, per second of train-step time;
      mfu:          every model FLOP, the train step's and the side work's, over the elapsed time and the peak."""
    train_tokens = steps * batch_tokens * passes
    flops = train_tokens * flops_per_token + side_flops
    return {"tokens_per_s": train_tokens / max(elapsed - side_seconds, 1e-9),
            "mfu": flops / max(elapsed, 1e-9) / (num_devices * peak_tflops * 1e12) if peak_tflops > 0 else float("nan")}


class MetricWriter:
    """Writes each logged step once to every sink: metrics.jsonl, TensorBoard, and W&B when a run is given.
    Only process 0 writes.

    In an object-store workdir (gs://, s3://), which cannot append, rows are buffered and metrics.jsonl is written
    whole at most every `flush_seconds`, at every `flush()` (the trainer's, before each checkpoint: every row up to
    a saved step is in the bucket before that step is) and at close. TensorBoard writes its event file in a local
    folder, uploaded whole (tensorboard/<file>) at the same moments."""

    def __init__(self, workdir: str, enabled: bool = True, wandb_run=None, flush_seconds: float = 30.0):
        self.enabled = enabled
        self.path = storage.as_path(workdir) / "metrics.jsonl"
        self.remote = storage.is_remote(self.path)
        self.flush_seconds = flush_seconds
        self._rows: list[str] = []          # object store: rows not yet in metrics.jsonl
        self._written: str | None = None    # object store: metrics.jsonl as last written (read at the first flush)
        self._last_flush = time.time()
        self._tb = self._tb_local = None
        self._tb_dir = storage.as_path(workdir) / "tensorboard"
        self._wandb = wandb_run
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter
                if self.remote:
                    # Its own local folder, uploaded file by file; the suffix keeps two writers of one second (a
                    # quick resume) from naming their event files alike and overwriting each other in the bucket.
                    self._tb_local = tempfile.mkdtemp(prefix="jaxllm-tensorboard-")
                    self._tb = SummaryWriter(self._tb_local, filename_suffix=f".{uuid.uuid4().hex[:8]}")
                else:
                    self._tb = SummaryWriter(str(self._tb_dir))
            except ImportError:  # TensorBoard is optional: JSONL and PNGs always work
                logging.warning("tensorboardX is not installed: no TensorBoard event files")

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        finite = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        # NaN / Inf are written as null: strict JSON readers reject bare NaN, and a missing key would hide them.
        row = {"step": int(step), **{k: finite.get(k) for k in values}}
        line = json.dumps(row, allow_nan=False) + "\n"
        if self.remote:
            self._rows.append(line)
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in finite.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(finite, step=int(step))
        if self.remote and time.time() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Object store: writes metrics.jsonl whole with the buffered rows, and uploads the TensorBoard files."""
        self._last_flush = time.time()
        if not (self.enabled and self.remote):
            return
        if self._rows:
            if self._written is None:
                self._written = self.path.read_text() if self.path.exists() else ""
            self._written += "".join(self._rows)
            self.path.write_text(self._written)
            self._rows = []
        if self._tb is not None:
            self._tb.flush()
            for f in Path(self._tb_local).iterdir():
                storage.upload_file(f, self._tb_dir / f.name)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self.flush()
        if self._tb_local is not None:   # uploaded by flush(): the local copy goes
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb, self._tb_local = None, None
        if self._wandb is not None:
            self._wandb.finish()


def drop_rows_after(path, step: int) -> int:
    """Resuming at `step` after a crash: the rows logged after it describe steps that run again now; drop them so
    every step has one row. Returns how many were dropped (logged by the caller). Rewritten atomically."""
    path = storage.as_path(path)
    if not path.exists():
        return 0

    def logged_by_then(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):   # a row cut short by the crash (kill -9 mid-write)
            return False

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if logged_by_then(line)]
    dropped = len(lines) - len(kept)
    if dropped:
        storage.write_text(path, "".join(line + "\n" for line in kept))
    return dropped


WANDB_MISSING = ("log.wandb is set but the wandb package is not installed: pip install 'jaxllm[wandb]' "
                 "(or pip install wandb), or leave log.wandb empty")


def wandb_module(log_cfg):
    """The wandb module when log.wandb names a project, else None; imported only then (an optional extra), and
    checked before a run starts so a missing package fails in one line, not after compiling."""
    if not log_cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        from jaxllm.config import ConfigError
        raise ConfigError(WANDB_MISSING) from None
    return wandb


def open_wandb_run(wandb, log_cfg, workdir: str, config: dict):
    """The W&B run of this workdir: a resumed workdir continues the same W&B run (its id is kept in
    <workdir>/wandb_run_id). The mode comes from W&B's own settings, so WANDB_MODE=offline writes
    <workdir>/wandb/ for `wandb sync`."""
    id_file = storage.as_path(workdir) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:16]
    id_file.write_text(run_id + "\n")
    # W&B keeps its files in a local folder: the workdir's own, or for an object store a per-machine cache one
    local = storage.local_cache_dir(workdir, "wandb") if storage.is_remote(workdir) else workdir
    return wandb.init(project=log_cfg.wandb, entity=log_cfg.wandb_entity or None,
                      name=log_cfg.wandb_name or storage.absolute(workdir).name, id=run_id, resume="allow",
                      dir=str(local), config=config)


class Progress:
    """A console line per log interval: step/total, percent, ETA and the chosen metrics."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total, self.start_step, self.t0 = total_steps, start_step, time.time()

    def line(self, step: int, values: dict) -> str:
        done = max(step - self.start_step, 1)
        eta = (time.time() - self.t0) / done * (self.total - step)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        return f"[{step:>6d}/{self.total} {100 * step / self.total:5.1f}% eta {eta:6.0f}s] {shown}"


def _fmt(v) -> str:
    v = float(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}"


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in storage.as_path(path).read_text().splitlines() if line.strip()]


def save_figure(fig, out_png, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG file, local or in an object store (rendered to bytes, written whole)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    storage.write_bytes(out_png, buffer.getvalue())


def plot_curves(metrics_path: str, out_png: str, keys=("train/loss", "eval/loss"), title: str = "loss") -> str | None:
    """Draws the named metrics against step into one PNG; returns its path (None if nothing to draw)."""
    if not storage.as_path(metrics_path).exists():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return out_png


def record_gap_distribution(workdir: str, step: int, gaps, bins: int = 30) -> None:
    """Reward-model figures: this evaluation's histogram of r_chosen − r_rejected, and the mean ± std curve
    over every evaluation so far (kept in eval/reward_gaps.jsonl so a resumed run extends it)."""
    import numpy as np
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = np.asarray(gaps, np.float64)
    history_path = storage.as_path(workdir) / "eval" / "reward_gaps.jsonl"
    row = {"step": int(step), "mean": float(gaps.mean()), "var": float(gaps.var()),
           "accuracy": float((gaps > 0).mean()), "n": int(gaps.size), "gaps": [round(float(g), 5) for g in gaps]}
    storage.append_text(history_path, json.dumps(row) + "\n")
    history = {r["step"]: r for r in read_metrics(str(history_path))}   # a resumed run may repeat a step
    plots = storage.as_path(workdir) / "plots"

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.hist(gaps, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_title(f"reward gap r_chosen − r_rejected at step {step}: mean {row['mean']:.3f}, "
                 f"var {row['var']:.3f}, acc {row['accuracy']:.2f}", fontsize=9)
    ax.set_xlabel("gap")
    ax.set_ylabel("held-out pairs")
    fig.tight_layout()
    save_figure(fig, plots / f"reward_gap_hist_step{step:06d}.png")
    plt.close(fig)

    steps = sorted(history)
    means = np.array([history[s]["mean"] for s in steps])
    stds = np.sqrt([history[s]["var"] for s in steps])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(steps, means, marker="o", label="mean gap")
    left.fill_between(steps, means - stds, means + stds, alpha=0.25, label="± std")
    left.axhline(0.0, color="black", linewidth=1)
    left.set_xlabel("step")
    left.set_ylabel("r_chosen − r_rejected")
    left.legend()
    chosen = [steps[0], steps[len(steps) // 2], steps[-1]] if len(steps) > 2 else steps
    for s in dict.fromkeys(chosen):
        right.hist(history[s]["gaps"], bins=bins, alpha=0.45, label=f"step {s}")
    right.axvline(0.0, color="black", linewidth=1)
    right.set_xlabel("gap")
    right.legend()
    fig.tight_layout()
    save_figure(fig, plots / "reward_gap_curve.png")
    plt.close(fig)
