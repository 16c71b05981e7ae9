"""Training throughput of jaxsft's train step, side by side with the seed's PyTorch loop.

    python -m benchmarks.throughput --model resnet50 --image-size 224 --batch-size 128 \\
        --dtype bf16 --json benchmarks/results/gpu.json
    python -m benchmarks.throughput --quick          # resnet18 at 64x64: a smoke test

Reports images/s, ms/step (median and quartiles over timed steps after warm-up, each step
synchronised with the device unless --sync block), lower and compile time (with the
persistent compilation cache's hit or miss), peak device memory where the backend reports
it, XLA's memory plan of the compiled step, and MFU: the model's FLOPs per step
(benchmarks/flops.py: counted per layer, 3 x forward, "model-count") over the median step time,
against the device's peak (benchmarks/peaks.py, or --peak-tflops). XLA's cost analysis of the
compiled step ("xla-cost-analysis", which on GPUs misses the cuDNN convolutions) and of the
unoptimised one ("xla-cost-analysis-lowered") are kept beside it as cross-checks. The jaxsft
step is `jaxsft.train_step` pmapped over the first --devices devices, exactly as
`jaxsft.steps.pmap_train_step` builds it, with jaxsft's optimizer set as the seed's (SGD lr
0.01, momentum 0.9) and cross-entropy.

When torch is installed the same run times the seed's loop on torchvision's model with the
same shapes (benchmarks/torch_loop.py), in alternating rounds (jaxsft, torch variants,
jaxsft, ...) so that drift on a shared machine cancels in the per-round ratio
jaxsft images/s / torch images/s. Data are synthetic and already on the device unless
--pipeline, which feeds jaxsft.data's real input pipeline (TensorFlow is imported only then).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import flops, peaks, torch_loop
from jaxsft import compilation_cache as cache
from jaxsft import cpu

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
QUICK = dict(model="resnet18", image_size=64, batch_size=4, steps=4, warmup=1, rounds=2)
# Warm-up alternations continue past --warmup while they page-fault this much (the
# shared heap still growing, see measure), up to MAX_WARMUP of them.
QUIET_FAULTS = 10_000  # 4 KiB pages: 40 MiB
MAX_WARMUP = 8


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one benchmark run depends on (the command line, parsed)."""

    model: str = "resnet50"
    image_size: int = 224
    batch_size: int = 128  # per device
    dtype: str = "fp32"
    bn: str = "train"
    devices: int | None = 1  # None: all local devices
    steps: int = 20  # timed steps per runner, spread over the rounds
    warmup: int = 3
    rounds: int = 4
    sync: str = "step"
    pipeline: bool = False
    dataset: str = "digits"
    data_dir: str | None = None
    torch: bool = True
    torch_variants: tuple[str, ...] | None = None
    peak_tflops: float | None = None
    cpu_threads: int | None = None  # pin the process to this many cores (both frameworks)
    num_classes: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    cache_dir: str | None = None
    use_cache: bool = True
    notes: tuple[str, ...] = ()

    @property
    def steps_per_round(self) -> int:
        return -(-self.steps // self.rounds)


class Runner(Protocol):
    """What the timing loop needs of jaxsft's step and of each torch variant."""

    name: str

    def step(self, sync: bool = True) -> None: ...
    def sync(self) -> None: ...
    def loss(self) -> float: ...
    def peak_memory_bytes(self) -> int | None: ...
    def describe(self) -> dict[str, Any]: ...


# ------------------------------------------------------------------------- jaxsft


class JaxLoop:
    """jaxsft's train step, compiled ahead of time, on N devices with a replicated state."""

    name = "jaxsft"

    def __init__(self, s: Settings, devices: list[jax.Device], cache_dir: Path | None,
                 variables: dict[str, Any] | None = None) -> None:
        from jaxsft import TrainState, create_model, steps

        self.devices = devices
        self.dtype = s.dtype
        model = accelerated(create_model(s.model, num_classes=s.num_classes,
                                         dtype=DTYPES[s.dtype]))
        t0 = time.perf_counter()
        variables = variables or init_variables(model, s)
        state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                                  batch_stats=variables["batch_stats"],
                                  tx=seed_optimizer(s, global_batch=s.batch_size * len(devices)))
        self.state = steps.replicate(state, devices)
        jax.block_until_ready(self.state)
        self.init_s = time.perf_counter() - t0

        # What steps.pmap_train_step builds, restricted to the first N devices.
        step = functools.partial(steps.train_step, axis_name=steps.AXIS, bn_mode=s.bn)
        pstep = jax.pmap(step, axis_name=steps.AXIS, donate_argnums=(0,), devices=devices)
        self.batches = pipeline_batches(s, devices) if s.pipeline else None
        self.batch = next(self.batches) if self.batches else synthetic_batch(s, devices)

        before = cache.cache_entries(cache_dir)
        t0 = time.perf_counter()
        lowered = pstep.lower(self.state, self.batch)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.cache_state = cache_state(cache_dir, before)
        self.flops = compiled_flops(self.compiled)
        per_image = model_flops(s)
        self.flop_counts = {
            "model-count": per_image * s.batch_size if per_image else None,
            "xla-cost-analysis": self.flops,
            "xla-cost-analysis-lowered": flops.lowered_flops(lowered),
        }
        self.mfu_flops, self.mfu_flops_source = flops.mfu_flops(
            self.flop_counts["model-count"], self.flops)
        self.memory_plan = memory_plan(self.compiled)
        self.metrics: dict[str, jax.Array] | None = None

    def step(self, sync: bool = True) -> None:
        batch = next(self.batches) if self.batches else self.batch
        self.state, self.metrics = self.compiled(self.state, batch)
        if sync:
            # All outputs of one execution become ready together; the loss stands for all.
            self.metrics["loss"].block_until_ready()

    def sync(self) -> None:
        jax.block_until_ready((self.state, self.metrics))

    def loss(self) -> float:
        return float(np.asarray(self.metrics["loss"])[0]) if self.metrics else float("nan")

    def peak_memory_bytes(self) -> int | None:
        stats = self.devices[0].memory_stats()
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None

    def describe(self) -> dict[str, Any]:
        return {
            "init_s": self.init_s,
            "lower_s": self.lower_s,
            "compile_s": self.compile_s,
            "compilation_cache": self.cache_state,
            "flops_per_device_step": self.flops,
            "flop_counts_per_device_step": self.flop_counts,
            "mfu_flops_source": self.mfu_flops_source,
            "compiled_memory_bytes": self.memory_plan,
            "dtype": self.dtype,
        }


def seed_optimizer(s: Settings, global_batch: int) -> optax.GradientTransformation:
    """jaxsft's optimizer as `jaxsft.train` builds it, configured as the seed's
    `SGD(lr, momentum)`: constant rate, no weight decay, torch.optim.SGD semantics."""
    from jaxsft.config import Config
    from jaxsft.optim import create_optimizer

    cfg = Config().replace(optimizer="sgd", lr=s.lr, momentum=s.momentum, weight_decay=0.0,
                           schedule="constant")
    tx, _ = create_optimizer(cfg.optim, total_steps=10**9, steps_per_epoch=1000,
                             batch_size=global_batch)
    return tx


def accelerated(model: Any) -> Any:
    """On the CPU backend, the model with jaxsft's XLA:CPU kernels (what `jaxsft.train` runs)."""
    return cpu.accelerate(model) if jax.default_backend() == "cpu" else model


def init_variables(model: Any, s: Settings) -> dict[str, Any]:
    """The model's own initialisers, run once on the default device.

    The "rbg" bit generator compiles 2-3x faster on the CPU than the default threefry; the
    values do not change the timings.
    """
    init = jax.jit(functools.partial(model.init, train=False))
    return init(jax.random.key(s.seed, impl="rbg"),
                jnp.zeros((1, s.image_size, s.image_size, 3), jnp.float32))


def synthetic_batch(s: Settings, devices: list[jax.Device]) -> dict[str, jax.Array]:
    """Random images and labels made on the devices, [devices, per_device, H, W, 3]."""
    from jaxsft import steps

    mesh = jax.sharding.Mesh(np.array(devices), (steps.AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(steps.AXIS))
    shape = (len(devices), s.batch_size)

    @functools.partial(jax.jit, out_shardings=sharding)
    def make(key: jax.Array) -> dict[str, jax.Array]:
        k_image, k_label = jax.random.split(key)
        return {
            "image": jax.random.normal(k_image, (*shape, s.image_size, s.image_size, 3)),
            "label": jax.random.randint(k_label, shape, 0, s.num_classes),
        }

    return make(jax.random.key(s.seed + 1))


def pipeline_batches(s: Settings, devices: list[jax.Device]):
    """jaxsft.data's training pipeline (imports TensorFlow), prefetched onto the devices."""
    from jaxsft import data
    from jaxsft.config import Config

    cfg = Config().replace(dataset=s.dataset, data_dir=s.data_dir, image_size=s.image_size,
                           batch_size=s.batch_size * len(devices))
    batches = data.train_batches(cfg.data, seed=s.seed, num_devices=len(devices))
    return data.device_prefetch(batches, devices=devices)


def cache_state(cache_dir: Path | None, entries_before: int) -> str:
    """"miss" if the compile wrote an entry, "hit" if a non-empty cache gained none."""
    if cache_dir is None:
        return "off"
    after = cache.cache_entries(cache_dir)
    if after > entries_before:
        return "miss"
    return "hit" if after else "not stored"


def model_flops(s: Settings) -> float | None:
    """The model's FLOPs per example of one training step (benchmarks.flops), or None."""
    try:
        return float(flops.count(s.model, s.image_size, num_classes=s.num_classes)["train_step"])
    except Exception:  # an architecture the counter cannot trace: MFU falls back to XLA's
        return None


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one execution of the compiled per-device program (XLA's cost analysis)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def memory_plan(compiled: Any) -> dict[str, int] | None:
    """XLA's static memory plan per device: arguments, outputs, aliased, temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
             "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {n.removesuffix("_size_in_bytes"): int(getattr(m, n, 0)) for n in names}


# ------------------------------------------------------------------------- timing


def time_block(runner: Runner, steps: int, sync: str) -> list[float]:
    """Seconds per step: each step timed alone ("step"), or the block's mean ("block")."""
    if sync == "step":
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            runner.step(sync=True)
            times.append(time.perf_counter() - t0)
        runner.sync()
        return times
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step(sync=False)
    runner.sync()
    return [(time.perf_counter() - t0) / steps]


def measure(runners: Sequence[Runner], s: Settings, say=print,
            host: dict[str, dict[str, float]] | None = None) -> dict[str, list[list[float]]]:
    """Warm-up, then rounds of one timed block per runner in turn (A B A B ...).

    The warm-up (at least `s.warmup` steps per runner) alternates in blocks of a round's
    size too, and once one has grown the process's heap it goes on (up to MAX_WARMUP
    alternations) until two in a row do not: the runners share the heap, and each one's first
    steps after another's fragment it and extend it, page-faulting gigabytes (ResNet-50: 2 to
    4 alternations) that a lone training loop never pays. `host`, when given, receives each
    runner's kernel (system) time and minor page faults per timed step, and its number of
    warm-up steps.
    """
    block, warm, alternations, quiet, grew = max(1, s.steps_per_round), 0, 0, 0, False

    def settled() -> bool:  # once the heap has grown, two quiet alternations in a row
        return quiet >= (2 if grew else 1)

    while s.warmup and alternations < MAX_WARMUP:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for r in runners:
            for _ in range(block):
                r.step(sync=True)
        warm, alternations = warm + block, alternations + 1
        if resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < QUIET_FAULTS:
            quiet += 1
        else:
            quiet, grew = 0, True
        if warm >= s.warmup and settled():
            break
    if s.warmup and not settled():
        say(f"warm-up: the heap still grew after {alternations} alternations")
    elif grew:
        say(f"warm-up: {alternations} alternations until the heap stopped growing")
    blocks: dict[str, list[list[float]]] = {r.name: [] for r in runners}
    usage = {r.name: [0.0, 0] for r in runners}  # system seconds, minor faults
    for i in range(s.rounds):
        for r in runners:
            before = resource.getrusage(resource.RUSAGE_SELF)
            blocks[r.name].append(time_block(r, s.steps_per_round, s.sync))
            after = resource.getrusage(resource.RUSAGE_SELF)
            usage[r.name][0] += after.ru_stime - before.ru_stime
            usage[r.name][1] += after.ru_minflt - before.ru_minflt
        line = "  ".join(f"{n} {1e3 * statistics.median(b[-1]):.1f}" for n, b in blocks.items())
        say(f"round {i + 1}/{s.rounds}: ms/step  {line}")
    if host is not None:
        steps = s.rounds * s.steps_per_round
        host.update({name: {"system_ms_per_step": 1e3 * sys_s / steps,
                            "minor_faults_per_step": faults / steps,
                            "warmup_steps": warm}
                     for name, (sys_s, faults) in usage.items()})
    return blocks


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, extremes and mean of step times, in milliseconds."""
    ms = sorted(1e3 * t for t in seconds)
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else ms * 3
    return {"median": statistics.median(ms), "q1": q1, "q3": q3, "min": ms[0], "max": ms[-1],
            "mean": statistics.fmean(ms), "n": len(ms)}


def ratios(blocks: dict[str, list[list[float]]], reference: str = "jaxsft") -> dict[str, Any]:
    """Per round, other's median step time / jaxsft's: jaxsft's speed relative to each other."""
    out = {}
    for name, rounds in blocks.items():
        if name == reference:
            continue
        per_round = [statistics.median(o) / statistics.median(j)
                     for o, j in zip(rounds, blocks[reference])]
        out[name] = {"median": statistics.median(per_round), "min": min(per_round),
                     "max": max(per_round), "per_round": per_round}
    return out


def mfu(flops: float | None, step_s: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak FLOP/s (per device)."""
    if not flops or not peak:
        return None
    return flops / step_s / (peak * 1e12)


# ------------------------------------------------------------------------- the run


class BenchmarkError(ValueError):
    """A setting this machine cannot run; the message names the fix."""


def run(s: Settings, argv: Sequence[str] = (), say=print) -> dict[str, Any]:
    """Builds, compiles, times and compares; returns the JSON-ready result."""
    cache_dir = cache.enable_compilation_cache(s.cache_dir) if s.use_cache else None
    devices = pick_devices(s.devices)
    backend = devices[0].platform
    load_before = os.getloadavg()
    notes = list(s.notes)
    torch_runners: list[Runner] = []
    torch_device, why_not = torch_device_for(backend, len(devices), s)
    if torch_device is None:
        notes.append(f"no PyTorch baseline: {why_not}")
    else:
        # Built before the JAX side: torchvision imported after TensorFlow (--pipeline)
        # crashes the process (seen with torch 2.14 / tensorflow 2.21).
        for v in s.torch_variants or torch_loop.default_variants(torch_device):
            torch_runners.append(torch_loop.TorchLoop(
                v, model=s.model, num_classes=s.num_classes, image_size=s.image_size,
                batch_size=s.batch_size, bn_mode=s.bn, lr=s.lr, momentum=s.momentum,
                device=torch_device, seed=s.seed))
    jax_loop = build_jax_loop(s, devices, cache_dir, say)
    runners: list[Runner] = [jax_loop, *torch_runners]
    host: dict[str, dict[str, float]] = {}
    blocks = measure(runners, s, say, host)
    load_after = os.getloadavg()
    results = {}
    for r in runners:
        n = len(devices) if r is jax_loop else 1
        results[r.name] = {**entry(r, blocks[r.name], s.batch_size * n, jax_loop.mfu_flops,
                                   s.peak_tflops, devices[0].device_kind), **host[r.name]}
    notes += automatic_notes(s, backend, len(devices), load_before, load_after)
    return {
        **context("throughput", argv, s, devices, cache_dir),
        "load_average": {"before": load_before, "after": load_after},
        "results": results,
        "ratios": ratios(blocks),
        "notes": notes,
    }


def build_jax_loop(s: Settings, devices: list[jax.Device], cache_dir: Path | None,
                   say=print, variables: dict[str, Any] | None = None) -> JaxLoop:
    say(f"jaxsft {s.model} {s.image_size}x{s.image_size}, batch {s.batch_size}/device on "
        f"{len(devices)} {devices[0].device_kind} device(s), {s.dtype}, BN {s.bn}: compiling")
    loop = JaxLoop(s, devices, cache_dir, variables)
    say(f"  init {loop.init_s:.1f}s, lower {loop.lower_s:.1f}s, compile {loop.compile_s:.1f}s "
        f"(cache {loop.cache_state})")
    return loop


def entry(r: Runner, blocks: list[list[float]], global_batch: int, flops: float | None,
          peak: float | None, device_kind: str) -> dict[str, Any]:
    """One runner's figures. `flops` (per device and step: the model count, or XLA's) come
    from the JAX side: the same model and shapes, so they serve the torch variants' MFU too."""
    info = r.describe()
    stats = summarize([t for b in blocks for t in b])
    peak = peak if peak is not None else peaks.peak_tflops(device_kind, info["dtype"])
    return {
        **info,
        "images_per_s": global_batch / (stats["median"] / 1e3),
        "images_per_s_mean": global_batch / (stats["mean"] / 1e3),
        "ms_per_step": stats,
        "ms_per_step_per_round": [1e3 * statistics.median(b) for b in blocks],
        "mfu": mfu(flops, stats["median"] / 1e3, peak),
        "peak_tflops": peak,
        "peak_memory_bytes": r.peak_memory_bytes(),
        "last_loss": r.loss(),
    }


def context(prog: str, argv: Sequence[str], s: Settings, devices: list[jax.Device],
            cache_dir: Path | None) -> dict[str, Any]:
    """What a result file needs to be reproduced and compared: command, date, setup."""
    return {
        "command": f"python -m benchmarks.{prog} " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**dataclasses.asdict(s), "devices": len(devices),
                     "global_batch": s.batch_size * len(devices),
                     "steps_per_round": s.steps_per_round,
                     "data": "pipeline" if s.pipeline else "synthetic",
                     "compilation_cache_dir": str(cache_dir) if cache_dir else None},
        "hardware": hardware(devices),
        "versions": versions(),
        "imported_tensorflow": "tensorflow" in sys.modules,
    }


def pin_cores(n: int) -> None:
    """Restricts this process to its first n usable cores. XLA:CPU and torch size their
    thread pools from the affinity mask, so this must run before either starts."""
    usable = sorted(os.sched_getaffinity(0))
    if n > len(usable):
        raise BenchmarkError(f"--cpu-threads {n}: only {len(usable)} usable cores")
    os.sched_setaffinity(0, usable[:n])


def pick_devices(n: int | None) -> list[jax.Device]:
    """The first n local devices (all when n is None), or a message naming the fix."""
    local = jax.local_devices()
    n = len(local) if n is None else n
    if n < 1 or n > len(local):
        hint = (" (on the CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{n}, as benchmarks.scaling does)" if local[0].platform == "cpu" else "")
        raise BenchmarkError(f"--devices {n}: this machine has {len(local)} "
                             f"{local[0].platform} device(s){hint}")
    return local[:n]


def torch_device_for(backend: str, n_devices: int, s: Settings) -> tuple[str | None, str]:
    """The torch device matching JAX's backend, or None and the reason."""
    if not s.torch:
        return None, "--no-torch"
    if not torch_loop.torch_available():
        return None, "torch/torchvision not installed"
    if n_devices != 1:
        return None, "the seed's loop is single-device; compare with --devices 1"
    if backend == "cpu":
        return "cpu", ""
    if backend in ("gpu", "cuda", "rocm"):
        import torch

        if torch.cuda.is_available():
            return "cuda", ""
        return None, "torch sees no CUDA device"
    return None, f"no torch device for the {backend} backend"


def automatic_notes(s: Settings, backend: str, n: int, before: Sequence[float],
                    after: Sequence[float]) -> list[str]:
    notes = []
    cores = os.cpu_count() or 1
    if backend == "cpu":
        notes.append("CPU: MFU only with --peak-tflops" if s.peak_tflops is None else
                     f"CPU: MFU against the given peak of {s.peak_tflops} TFLOP/s")
        if s.cpu_threads:
            notes.append(f"process pinned to {s.cpu_threads} core(s): XLA's and torch's "
                         "thread pools sized to it")
        if max(*before, *after) > 0.75 * cores:
            notes.append(
                f"shared CPU: load average {before[0]:.1f} before and {after[0]:.1f} after on "
                f"{cores} cores, so absolute times are noisy and the per-round ratios "
                "(alternating blocks) are the comparable figures; with more runnable threads "
                "than cores, multi-threaded steps stall at their barriers whenever one thread "
                "is descheduled, which can hurt one framework more than the other "
                "(--cpu-threads 1 avoids it)")
        if n > 1:
            notes.append("forced host devices share the same cores: a functional check of "
                         "the multi-device path, not a measure of scaling")
    elif s.dtype == "fp32":
        notes.append("fp32 on GPU: XLA and cuDNN both default to TF32 for convolutions; "
                     "MFU is against the TF32 peak")
    if s.pipeline:
        notes.append("jaxsft fed by jaxsft.data's pipeline; the torch baseline stays on "
                     "synthetic on-device data")
    if s.sync == "step":
        notes.append("each step synchronised with the device (ms/step spread is per step)")
    else:
        notes.append("steps pipelined, synchronised once per block (spread is over blocks)")
    return notes


def hardware(devices: list[jax.Device]) -> dict[str, Any]:
    d = devices[0]
    out: dict[str, Any] = {
        "platform": d.platform,
        "device_kind": d.device_kind,
        "devices_used": len(devices),
        "local_devices": jax.local_device_count(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.platform(),
    }
    try:
        out["platform_version"] = d.client.platform_version
    except AttributeError:
        pass
    if hasattr(os, "sched_getaffinity"):
        out["cpu_cores_usable"] = len(os.sched_getaffinity(0))
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision", "jaxsft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["jaxsft_git"] = git_commit()
    # What the process ran under: jaxsft's XLA:CPU flags and glibc malloc tuning (or the user's).
    for var in ("XLA_FLAGS", "GLIBC_TUNABLES"):
        out[var] = os.environ.get(var)
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


# ------------------------------------------------------------------------- output


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = (f"{s['model']} {s['image_size']}x{s['image_size']}, batch {s['batch_size']}/device "
            f"x {s['devices']} {result['hardware']['device_kind']}, {s['dtype']}, BN {s['bn']}, "
            f"{s['data']} data, {s['rounds']} rounds x {s['steps_per_round']} steps")
    cols = ("", "img/s", "ms/step median [q1-q3]", "compile s", "MFU", "peak mem",
            "sys ms/step", "jaxsft / this [min-max]")
    rows = [cols]
    for name, r in result["results"].items():
        ms = r["ms_per_step"]
        ratio = result["ratios"].get(name)
        rows.append((
            name,
            f"{r['images_per_s']:.1f}",
            f"{ms['median']:.1f} [{ms['q1']:.1f}-{ms['q3']:.1f}]",
            f"{r['compile_s']:.1f} ({r['compilation_cache']})" if "compile_s" in r else "-",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] else "-",
            f"{r['system_ms_per_step']:.0f}" if "system_ms_per_step" in r else "-",
            f"{ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}]" if ratio else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    jax_r = result["results"]["jaxsft"]
    counts = {k: f"{v / s['batch_size'] / 1e9:.2f}"
              for k, v in jax_r.get("flop_counts_per_device_step", {}).items() if v}
    if counts:
        lines.append("GFLOP per image per train step: "
                     + ", ".join(f"{k} {v}" for k, v in counts.items())
                     + f"; MFU from {jax_r['mfu_flops_source']}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="architecture (jaxsft.list_models())")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="compute dtype")
    p.add_argument("--bn", choices=("train", "frozen"), default=d.bn, help="BatchNorm mode")
    p.add_argument("--devices", default=str(d.devices), help="number of devices, or 'all'")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="timed steps per runner, spread over the rounds")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="untimed steps per runner after compiling, at least: alternating "
                        "blocks go on while the shared heap still grows")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="alternating rounds (one timed block per runner each)")
    p.add_argument("--sync", choices=("step", "block"), default=d.sync,
                   help="synchronise the device after every step, or once per block")
    p.add_argument("--pipeline", action="store_true",
                   help="feed jaxsft.data's input pipeline instead of synthetic on-device data")
    p.add_argument("--dataset", default=d.dataset, help="with --pipeline: the data set")
    p.add_argument("--data-dir", default=None, help="with --pipeline: TFDS data directory")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--torch-variants", default=None,
                   help=f"comma-separated, from {', '.join(torch_loop.VARIANTS)} "
                        "(default: torch,torch-cl on CPU; torch,torch-amp-cl on GPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: benchmarks/peaks.py)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="pin the process to this many CPU cores before JAX and torch start, "
                        "so both size their thread pools to it (1 gives stable ratios on a "
                        "shared, oversubscribed CPU); default: all usable cores")
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--cache-dir", default=None,
                   help="persistent compilation cache (default: ~/.cache/jaxsft/jax-cache)")
    p.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")
    p.add_argument("--note", action="append", default=[], help="free text kept in the JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test sizes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--json", default=None, help="write the result here")
    return p


def parse_args(argv: Sequence[str]) -> tuple[Settings, str | None]:
    """Settings and the JSON path; --quick changes the defaults, explicit flags still win."""
    parser = build_parser()
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    a = parser.parse_args(argv)
    from jaxsft.models import ARCHITECTURES

    if a.model not in ARCHITECTURES:
        parser.error(f"--model {a.model!r} unknown; choose from {', '.join(ARCHITECTURES)}")
    for flag in ("image_size", "batch_size", "steps", "rounds", "num_classes"):
        if getattr(a, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if a.cpu_threads is not None and a.cpu_threads < 1:
        parser.error("--cpu-threads must be at least 1")
    if a.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if a.devices != "all" and not a.devices.isdigit():
        parser.error(f"--devices must be a number or 'all', got {a.devices!r}")
    variants = None
    if a.torch_variants:
        variants = tuple(v.strip() for v in a.torch_variants.split(",") if v.strip())
        bad = [v for v in variants if v not in torch_loop.VARIANTS]
        if bad:
            parser.error(f"--torch-variants: unknown {bad}; choose from "
                         f"{', '.join(torch_loop.VARIANTS)}")
    s = Settings(
        model=a.model, image_size=a.image_size, batch_size=a.batch_size, dtype=a.dtype,
        bn=a.bn, devices=None if a.devices == "all" else int(a.devices), steps=a.steps,
        warmup=a.warmup, rounds=a.rounds, sync=a.sync, pipeline=a.pipeline,
        dataset=a.dataset, data_dir=a.data_dir, torch=not a.no_torch,
        torch_variants=variants, peak_tflops=a.peak_tflops, cpu_threads=a.cpu_threads,
        num_classes=a.num_classes,
        lr=a.lr, momentum=a.momentum, seed=a.seed, cache_dir=a.cache_dir,
        use_cache=not a.no_cache, notes=tuple(a.note),
    )
    return s, a.json


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    cpu.configure()  # XLA:CPU flags, before JAX starts its backend
    argv = list(sys.argv[1:] if argv is None else argv)
    s, json_path = parse_args(argv)
    # jax and torch share one GPU: keep JAX from preallocating 75% of its memory.
    if s.torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    if s.cpu_threads:
        try:
            pin_cores(s.cpu_threads)
        except BenchmarkError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        result = run(s, argv)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    cpu.reexec_with_tuned_malloc()  # both frameworks run in this process: same malloc
    sys.exit(main())
