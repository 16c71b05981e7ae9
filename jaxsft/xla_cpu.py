"""An XLA:CPU setting that makes training steps ~1.3x faster, applied when jaxsft is imported.

In jaxlib 0.10.2, XLA:CPU hands every convolution to YNNPACK, which runs it on one thread:
on 2 cores a 3x3 convolution takes as long as on one, while Eigen's convolution uses all
cores (forward 35 -> 21 ms, kernel gradient 101 -> 41 ms for 32x56x56x64). This flag moves
convolutions back to Eigen and keeps YNNPACK for matrix products and elementwise fusions,
where it is fast. Measured in benchmarks/cpu_notes.md (ResNet-18 step: 1.15-1.3x). It only
concerns the CPU backend; GPU and TPU are untouched. The rounding of a convolution may differ
between the two libraries, never more than between two orders of summation.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so the flag counts only when
jaxsft is imported before the first JAX computation (the CLIs always are). Setting
`--xla_cpu_experimental_ynn_fusion_type` yourself in XLA_FLAGS (to anything) keeps your
value. The flag is experimental: it is added only for jaxlib versions it was tested with,
because XLA aborts on a flag it does not know.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=-individual_convolution"
TESTED_JAXLIB = ("0.10.2",)  # versions whose XLA knows the flag (tests/test_xla_cpu.py)


def jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def apply(environ: MutableMapping[str, str] = os.environ,
          jaxlib: str | None = None) -> bool:
    """Appends FLAG to XLA_FLAGS unless the user set that flag; True when it is in effect."""
    flags = environ.get("XLA_FLAGS", "")
    if FLAG_NAME in flags:
        return FLAG in flags.split()
    version = jaxlib if jaxlib is not None else jaxlib_version()
    if version is None or not version.startswith(TESTED_JAXLIB):
        return False
    environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True
