"""TensorFlow side of `jaxsft.data`: sources, image transforms and the tf.data pipeline.

Importing this package imports TensorFlow, so only `jaxsft.data` imports it, lazily, inside
the functions that read data. TensorFlow is hidden from every GPU here, before anything in
it runs: the accelerators belong to JAX, and a TF that grabs GPU memory starves the model.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up banners, not our logs

import tensorflow as tf  # noqa: E402


def _hide_gpus_from_tf() -> None:
    try:
        if tf.config.list_physical_devices("GPU"):
            tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF was initialised by someone else before us; nothing left to do
        pass


_hide_gpus_from_tf()
