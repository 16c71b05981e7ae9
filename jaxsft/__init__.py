"""jaxsft: supervised fine-tuning of pretrained ResNets in pure JAX.

The public names resolve lazily, so `import jaxsft` costs nothing until a name is used,
and TensorFlow is imported only by the data module, only when data is read. The import does
one thing: it adds two XLA:CPU speed flags to XLA_FLAGS (jaxsft/xla_cpu.py says which, why,
and how to keep your own settings).
"""

import importlib

from jaxsft.cpu import xla_flags

__version__ = "0.1.0"

# Before JAX starts a backend: XLA reads its flags once (see jaxsft/xla_cpu.py).
xla_flags.apply()

_EXPORTS = {
    "create_model": "jaxsft.models",
    "list_models": "jaxsft.models",
    "load_weights": "jaxsft.weights",
    "WeightsError": "jaxsft.weights",
    "to_torch_state_dict": "jaxsft.weights",
    "save_torch_state_dict": "jaxsft.weights",
    "TrainState": "jaxsft.state",
    "train_step": "jaxsft.steps",
    "eval_step": "jaxsft.steps",
    "pmap_train_step": "jaxsft.steps",
    "pmap_eval_step": "jaxsft.steps",
    "replicate": "jaxsft.steps",
    "unreplicate": "jaxsft.steps",
    "create_optimizer": "jaxsft.optim",
    "fit": "jaxsft.trainer",
    "evaluate": "jaxsft.trainer",
    "Config": "jaxsft.config",
    "ConfigError": "jaxsft.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxsft' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
