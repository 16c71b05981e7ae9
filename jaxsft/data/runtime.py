"""How TensorFlow runs in a jaxsft process: quiet, and off the accelerators.

Importing this module imports nothing and changes nothing. Two calls:
- `quiet_tensorflow()`: what a CLI sets in its environment before TensorFlow starts, to
  silence start-up noise that is not the user's business;
- `tensorflow()`: TensorFlow, imported when data is first read and hidden from every GPU
  before anything in it runs: the accelerators belong to JAX, and a TF that grabs GPU
  memory starves the model.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from types import ModuleType

# Set with setdefault, so a user's own setting wins.
QUIET_ENVIRON = {
    # TF's C++ INFO and WARNING lines (CPU-feature banners and the like). TF reads it when
    # it loads, hence before the first import; it also quietens XLA's C++ INFO/WARNING lines.
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # "oneDNN custom operations are on ...": logged before TF's log level applies, so only
    # turning the custom operations off silences it. They change nothing jaxsft computes in
    # TF: the input pipeline (decode, crop, resize, flip, normalise) gives bit-identical
    # batches either way, and TF runs no model here. JAX's oneDNN is separate (XLA flags).
    "TF_ENABLE_ONEDNN_OPTS": "0",
}


def quiet_tensorflow(environ: MutableMapping[str, str] = os.environ) -> None:
    """Silences TensorFlow's start-up noise in `environ`; call it before TensorFlow loads.

    Sets TF_CPP_MIN_LOG_LEVEL=2 and TF_ENABLE_ONEDNN_OPTS=0 where they are not set yet. No
    TensorFlow import: the CLIs call it first thing (jaxsft.cli.run). A library user who
    wants the same calls it before importing TensorFlow.
    """
    for name, value in QUIET_ENVIRON.items():
        environ.setdefault(name, value)


def tensorflow() -> ModuleType:
    """TensorFlow, hidden from every GPU (a no-op once TF has initialised its devices)."""
    import tensorflow as tf

    try:
        if tf.config.list_physical_devices("GPU"):
            tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF's devices are already initialised: nothing left to change
        pass
    return tf
