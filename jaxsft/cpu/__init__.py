"""What exists only to make XLA:CPU fast, behind one entry point.

    import jaxsft, jaxsft.cpu
    jaxsft.cpu.configure()  # once, before JAX starts its backend (the CLIs do this)
    model = jaxsft.cpu.accelerate(jaxsft.create_model("resnet50", num_classes=10))

`accelerate` plugs the CPU kernels into a jaxsft ResNet: convolutions that pick, per pass and
shape, XLA's convolution, oneDNN's (`onednn.py`) or a matrix product (`conv.py`); a ReLU and
a max pool whose gradients read stored values (`stored.py`, `conv.py`). Each kernel computes
the plain model's function (float64 parity with torchvision holds for both) and takes its CPU
form only on the CPU backend (`lax.platform_dependent`), so an accelerated model is correct
anywhere; it is meant for the CPU. `configure` is the process-level part: the XLA:CPU flags
(`xla_flags.py`) and the silencing of one compilation-cache warning that oneDNN executables
cause. `reexec_with_tuned_malloc` (`malloc.py`) is what the command-line entry points run
first. Importing this package changes nothing and does not import JAX.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping
from typing import Any

from jaxsft.cpu import xla_flags
from jaxsft.cpu.malloc import reexec_with_tuned_malloc

__all__ = ["accelerate", "configure", "reexec_with_tuned_malloc"]

# JAX's warning when XLA:CPU fails to serialize an executable that calls oneDNN (onednn.py).
UNSERIALIZABLE = (r"Error writing persistent compilation cache entry for '[^']*': "
                  r"MemoryError: std::bad_alloc")


def accelerate(model: Any) -> Any:
    """`model` (a jaxsft ResNet) with XLA:CPU's fast convolution, ReLU and max pool plugged
    in; same variables (tree, shapes, dtypes) and the same function up to float rounding."""
    from jaxsft.cpu.conv import Conv, max_pool
    from jaxsft.cpu.stored import relu

    if not all(hasattr(model, field) for field in ("conv", "act", "pool")):
        raise TypeError(f"accelerate takes a jaxsft ResNet (jaxsft.create_model), got "
                        f"{type(model).__name__}")
    return model.clone(conv=Conv, act=relu, pool=max_pool)


def configure(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Process-wide set-up for XLA:CPU; call it before JAX starts its backend.

    Adds jaxsft's XLA:CPU flags to `environ["XLA_FLAGS"]` (a flag already set keeps its
    value; none on an untested jaxlib) and ignores JAX's warning that an executable calling
    oneDNN cannot be stored in the persistent compilation cache (it compiles again next run;
    any other cache failure still warns). Returns the flags in effect with jaxsft's value.
    """
    warnings.filterwarnings("ignore", message=UNSERIALIZABLE, category=UserWarning)
    return xla_flags.apply(environ)
