"""XLA:CPU flags that make training steps ~1.4x faster (set by `jaxsft.cpu.configure()`).

Two flags, each measured on ResNet training steps in benchmarks/cpu_notes.md:

- `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`: in jaxlib 0.10.2 XLA:CPU
  hands every convolution to YNNPACK, which runs it on one thread, while Eigen's convolution
  uses all cores (32x56x56x64 3x3 on 2 cores: forward 35 -> 21 ms, kernel gradient 101 -> 41
  ms). YNNPACK keeps matrix products and elementwise fusions, where it is fast. ResNet-18
  step: 1.15-1.3x.
- `--xla_cpu_use_fusion_emitters=false`: XLA's earlier loop emitters compile the elementwise
  fusions (BatchNorm, ReLU, max pool, layout transposes) into code 1.5-3x faster than the new
  fusion emitters on the measured machine. ResNet-18 step: 1.10-1.13x; ResNet-50: no change.

Both only concern the CPU backend; GPU and TPU are untouched. Neither changes what is
computed: a convolution's rounding may differ between Eigen and YNNPACK, never more than
between two orders of summation, and the parity tests against torchvision pass either way.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so the flags count only when
`jaxsft.cpu.configure()` runs before the first JAX computation (the CLIs and benchmarks call
it first; importing jaxsft sets nothing). A flag you set yourself in XLA_FLAGS (to any value)
keeps your value. The flags are experimental: they are added only for jaxlib versions they
were tested with, because XLA aborts on a flag it does not know.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
    "xla_cpu_use_fusion_emitters": "false",
}
TESTED_JAXLIB = ("0.10.2",)  # versions whose XLA knows the flags (tests/test_xla_cpu.py)


def jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_tested(versions: tuple[str, ...], jaxlib: str | None = None) -> bool:
    """Whether the installed jaxlib (or `jaxlib`) is one of `versions` (version prefixes)."""
    version = jaxlib if jaxlib is not None else jaxlib_version()
    return version is not None and version.startswith(versions)


def apply(environ: MutableMapping[str, str] = os.environ,
          jaxlib: str | None = None) -> dict[str, str]:
    """Appends each of FLAGS that the user has not set to XLA_FLAGS; returns those of FLAGS
    in effect with jaxsft's value (name -> value)."""
    if not is_tested(TESTED_JAXLIB, jaxlib):
        return {}
    flags = environ.get("XLA_FLAGS", "")
    tokens = flags.split()
    added = [f"--{name}={value}" for name, value in FLAGS.items()
             if not any(t == f"--{name}" or t.startswith(f"--{name}=") for t in tokens)]
    if added:
        environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    tokens = environ["XLA_FLAGS"].split()
    return {name: value for name, value in FLAGS.items() if f"--{name}={value}" in tokens}
