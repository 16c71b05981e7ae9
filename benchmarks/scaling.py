"""Data-parallel scaling of jaxsft's train step: images/s on 1, 2, 4, ... devices.

    python -m benchmarks.scaling --model resnet50 --batch-size 128 --dtype bf16
    python -m benchmarks.scaling --quick --counts 1,2,4     # on the CPU: a functional check

The per-device batch is fixed (weak scaling), so linear scaling is N times the one-device
images/s; efficiency = images/s on N / (N x images/s on 1). Every other flag is
benchmarks.throughput's (the PyTorch baseline is not run here). On the CPU the devices are
forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count, set here before JAX
starts its backend) that share the same cores: that exercises the multi-device code path and
the cross-device BatchNorm and gradient reductions, but it measures no scaling.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from jaxsft import cpu

FORCE_FLAG = "--xla_force_host_platform_device_count"
CPU_DEFAULT_DEVICES = 4


def force_host_devices(n: int) -> None:
    """Asks XLA for n CPU devices, unless XLA_FLAGS already says how many (no effect on GPUs,
    and none once JAX's backend has started)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FORCE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FORCE_FLAG}={n}".strip()


def default_counts(available: int) -> list[int]:
    """1, 2, 4, ... up to the devices available, and that number itself."""
    counts, n = [], 1
    while n < available:
        counts.append(n)
        n *= 2
    return counts + [available]


def efficiencies(images_per_s: dict[int, float]) -> dict[int, float]:
    """images/s on N over N times images/s on 1 (1.0 is linear)."""
    base = images_per_s[1]
    return {n: ips / (n * base) for n, ips in images_per_s.items()}


def run(s: Any, counts: Sequence[int] | None, argv: Sequence[str] = (),
        say=print) -> dict[str, Any]:
    """Times the jaxsft step on each device count in turn, in this process."""
    import jax

    from benchmarks import throughput
    from jaxsft import compilation_cache as cache

    cache_dir = cache.enable_compilation_cache(s.cache_dir) if s.use_cache else None
    local = jax.local_devices()
    counts = sorted(set(counts or default_counts(len(local))))
    if counts[0] != 1:
        raise throughput.BenchmarkError("--counts must include 1 (the base of the efficiency)")
    throughput.pick_devices(counts[-1])  # a clear error when there are too few
    from jaxsft import create_model

    load_before = os.getloadavg()
    model = throughput.accelerated(create_model(s.model, num_classes=s.num_classes,
                                                dtype=throughput.DTYPES[s.dtype]))
    variables = throughput.init_variables(model, s)  # once, shared by every count
    runs = []
    for n in counts:
        devices = local[:n]
        loop = throughput.build_jax_loop(s, devices, cache_dir, say, variables)
        blocks = throughput.measure([loop], s, say)
        e = throughput.entry(loop, blocks[loop.name], s.batch_size * n, loop.mfu_flops,
                             s.peak_tflops, devices[0].device_kind)
        runs.append({"devices": n, **e})
        del loop  # frees its device buffers before the next count
    load_after = os.getloadavg()
    eff = efficiencies({r["devices"]: r["images_per_s"] for r in runs})
    for r in runs:
        r["efficiency"] = eff[r["devices"]]
        r["images_per_s_per_device"] = r["images_per_s"] / r["devices"]
    notes = list(s.notes)
    if local[0].platform == "cpu":
        notes.append("CPU with forced host devices sharing the same cores: a functional check "
                     "of the multi-device path only; the efficiencies measure no scaling")
    notes.append("weak scaling: fixed per-device batch; efficiency = images/s(N) / "
                 "(N x images/s(1)) from median step times")
    ctx = throughput.context("scaling", argv, s, local[:counts[-1]], cache_dir)
    return {**ctx, "counts": counts, "load_average": {"before": load_before, "after": load_after},
            "runs": runs, "notes": notes}


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"{s['model']} {s['image_size']}x{s['image_size']}, batch {s['batch_size']}/device,"
             f" {s['dtype']}, BN {s['bn']}, {result['hardware']['device_kind']}",
             f"{'devices':>7}  {'img/s':>9}  {'img/s/device':>12}  {'ms/step':>9}  "
             f"{'efficiency':>10}  {'compile s':>9}"]
    for r in result["runs"]:
        lines.append(f"{r['devices']:>7}  {r['images_per_s']:>9.1f}  "
                     f"{r['images_per_s_per_device']:>12.1f}  {r['ms_per_step']['median']:>9.1f}"
                     f"  {100 * r['efficiency']:>9.0f}%  {r['compile_s']:>9.1f}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--counts", default=None,
                     help="device counts, comma-separated (default: 1, 2, 4, ... all)")
    own.add_argument("-h", "--help", action="store_true")
    a, rest = own.parse_known_args(argv)
    if a.help:
        print(__doc__)
        print("--counts N,N,...  device counts (default: 1, 2, 4, ... up to all devices)\n"
              "other flags: those of python -m benchmarks.throughput (see its --help)")
        return 0
    try:
        counts = [int(c) for c in a.counts.split(",")] if a.counts else None
    except ValueError:
        print(f"error: --counts must be integers separated by commas, got {a.counts!r}",
              file=sys.stderr)
        return 2
    if any(x.startswith("--devices") for x in rest):
        print("error: --devices is set by --counts here", file=sys.stderr)
        return 2
    force_host_devices(max(counts) if counts else CPU_DEFAULT_DEVICES)
    cpu.configure()  # XLA:CPU flags, before JAX starts its backend

    from benchmarks import throughput

    s, json_path = throughput.parse_args([*rest, "--no-torch"])
    try:
        if s.cpu_threads:
            throughput.pin_cores(s.cpu_threads)
        result = run(s, counts, argv)
    except throughput.BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if json_path:
        throughput.write_json(result, json_path)
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    cpu.reexec_with_tuned_malloc()  # both frameworks run in this process: same malloc
    sys.exit(main())
