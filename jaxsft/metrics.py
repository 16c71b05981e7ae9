"""Metric reduction, writers (JSON lines, TensorBoard), a progress bar and the curves plot.

Writers are small objects with `write(step, scalars)` and `close()`; the clock is injected,
so tests pass time in explicitly (as clu does).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from jaxsft.periodic import is_time
from jaxsft.workdir import METRICS_FILE


def reduce_train(steps: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per-step train metrics (host numbers) -> one window: example-weighted means."""
    rows = list(steps)
    count = sum(float(r["count"]) for r in rows)
    out = {
        "loss": sum(float(r["loss"]) * float(r["count"]) for r in rows) / max(count, 1.0),
        "top1": sum(float(r["top1"]) for r in rows) / max(count, 1.0),
        "top5": sum(float(r["top5"]) for r in rows) / max(count, 1.0),
        "grad_norm": float(np.mean([float(r["grad_norm"]) for r in rows])),
        "lr": float(rows[-1]["lr"]),
    }
    return out


def reduce_eval(batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per-batch eval sums -> loss, top-1 and top-5 over exactly the examples seen."""
    totals: dict[str, float] = {"loss_sum": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for b in batches:
        for k in totals:
            totals[k] += float(b[k])
    n = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / n, "top1": totals["top1"] / n,
            "top5": totals["top5"] / n, "count": int(totals["count"])}


class JsonlWriter:
    """Appends one JSON object per line: {"step": ..., "split": ..., <scalars>}.

    With `after`, rows of later steps already in the file (a run that stopped between
    checkpoints, now resumed at step `after`, replays them) and any torn last line are dropped
    first, by an atomic rewrite: the file never holds a step twice.
    """

    def __init__(self, path: str | Path, after: int | None = None):
        if after is not None:
            _keep_rows_until(Path(path), after)
        self._file = open(path, "a", buffering=1)

    def write(self, step: int, scalars: Mapping[str, float], split: str) -> None:
        self._file.write(json.dumps({"step": int(step), "split": split, **_floats(scalars)}) + "\n")

    def close(self) -> None:
        self._file.close()


def _keep_rows_until(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    lines = path.read_text().splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class TensorBoardWriter:
    """TensorBoard event files through tensorboardX (no TensorFlow needed)."""

    def __init__(self, logdir: str | Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir))

    def write(self, step: int, scalars: Mapping[str, float], split: str) -> None:
        for name, value in _floats(scalars).items():
            self._writer.add_scalar(f"{split}/{name}", value, int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiWriter:
    def __init__(self, writers: Iterable[Any]):
        self._writers = list(writers)

    def write(self, step: int, scalars: Mapping[str, float], split: str) -> None:
        for w in self._writers:
            w.write(step, scalars, split)

    def close(self) -> None:
        for w in self._writers:
            w.close()


class ProgressBar:
    """One line per epoch, redrawn in place: bar, step, loss, accuracy, images/s, ETA.

    Disabled (silent) when the stream is not a terminal, so logs and CI stay clean.
    """

    def __init__(self, total: int, desc: str, *, stream: IO[str] | None = None,
                 enabled: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 width: int = 24):
        self.total, self.desc, self.width = total, desc, width
        self._stream = stream or sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._clock = clock
        self._start = clock()
        self.done = 0

    def update(self, done: int, *, images_per_s: float | None = None, **scalars: float) -> str:
        """Moves to `done` of `total`; returns the line drawn (also when disabled)."""
        self.done = done
        elapsed = self._clock() - self._start
        rate = done / elapsed if elapsed > 0 and done else 0.0
        eta = (self.total - done) / rate if rate else float("nan")
        filled = int(self.width * done / max(self.total, 1))
        parts = [f"{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}"]
        parts += [f"{k} {_fmt(k, v)}" for k, v in scalars.items()]
        if images_per_s is not None:
            parts.append(f"{images_per_s:,.0f} img/s")
        parts.append(f"ETA {format_duration(eta)}")
        line = "  ".join(parts)
        if self.enabled:
            self._stream.write("\r" + line + "\033[K")
            self._stream.flush()
        return line

    def close(self) -> None:
        if self.enabled:
            self._stream.write("\n")
            self._stream.flush()


class EpochProgress:
    """The progress bar of the epoch in progress: opened at the epoch's first step (or the
    resume step), closed after its last step or when the run stops."""

    def __init__(self, steps_per_epoch: int, total_steps: int, *, enabled: bool | None = None,
                 stream: IO[str] | None = None):
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self._enabled, self._stream = enabled, stream
        self._bar: ProgressBar | None = None

    def begin(self, step: int) -> None:
        """Before `step` (1-based) runs: starts the epoch's bar (and its clock) if none is open."""
        if self._bar is None:
            epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
            length = min(self.steps_per_epoch, self.total_steps - step + 1 + in_epoch)
            self._bar = ProgressBar(length, f"epoch {epoch + 1}", enabled=self._enabled,
                                    stream=self._stream)

    def update(self, step: int, **scalars: float | None) -> None:
        assert self._bar is not None, "begin(step) first"
        self._bar.update((step - 1) % self.steps_per_epoch + 1, **scalars)

    def end(self, step: int) -> None:
        """After `step`: closes the bar if the step ended an epoch (or the run)."""
        if is_time(step, self.steps_per_epoch, self.total_steps):
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def eval_rows(workdir: str | Path) -> list[dict[str, Any]]:
    """A run's evaluation rows, in order, from its workdir's metrics file ([] if none)."""
    return [r for r in read_jsonl(Path(workdir) / METRICS_FILE) if r["split"] == "eval"]


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Loss and top-1 accuracy against step, train and eval, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _last_per_step(read_jsonl(metrics_path))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = [r for r in rows if r["split"] == split]
        if not pts:
            continue
        steps = [r["step"] for r in pts]
        ax_loss.plot(steps, [r["loss"] for r in pts], style, label=split)
        ax_acc.plot(steps, [100 * r["top1"] for r in pts], style, label=split)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="step", ylabel="top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def _last_per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A resumed run re-logs nothing twice, but keep the last row per (split, step) anyway."""
    latest = {(r["split"], r["step"]): r for r in rows if "loss" in r and "top1" in r}
    return [latest[k] for k in sorted(latest, key=lambda k: (k[1], k[0]))]


def _floats(scalars: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in scalars.items()}


def _fmt(name: str, value: float) -> str:
    return f"{100 * value:.1f}%" if name.startswith(("acc", "top")) else f"{value:.4f}"
