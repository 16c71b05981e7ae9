"""jaxsft: supervised fine-tuning of pretrained ResNets in pure JAX.

The public names resolve lazily, so `import jaxsft` costs nothing until a name is used,
and TensorFlow is imported only by the data module, only when data is read. Importing
jaxsft changes nothing in the host program (no environment variables, JAX config, warning
filters or hooks). The XLA:CPU speed-ups are one documented opt-in, `jaxsft.cpu`:
`jaxsft.cpu.configure()` before JAX starts, `jaxsft.cpu.accelerate(model)` on the model.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("cpu",)
_EXPORTS = {
    "create_model": "jaxsft.models",
    "list_models": "jaxsft.models",
    "load_weights": "jaxsft.weights",
    "WeightsError": "jaxsft.weights",
    "to_torch_state_dict": "jaxsft.weights",
    "save_torch_state_dict": "jaxsft.weights",
    "TrainState": "jaxsft.state",
    "ema_state": "jaxsft.state",
    "train_step": "jaxsft.steps",
    "eval_step": "jaxsft.steps",
    "pmap_train_step": "jaxsft.steps",
    "pmap_eval_step": "jaxsft.steps",
    "replicate": "jaxsft.steps",
    "unreplicate": "jaxsft.steps",
    "create_optimizer": "jaxsft.optim",
    "l2sp": "jaxsft.optim",
    "freeze_backbone_until": "jaxsft.optim",
    "lp_ft_bn_mode": "jaxsft.optim",
    "mix_batch": "jaxsft.mixing",
    "fit": "jaxsft.trainer",
    "evaluate": "jaxsft.trainer",
    "setup": "jaxsft.process",
    "class_mean_head": "jaxsft.imprint",
    "Config": "jaxsft.config",
    "ConfigError": "jaxsft.config",
    "logme": "jaxsft.transferability",
    "leep": "jaxsft.transferability",
    "nleep": "jaxsft.transferability",
    "sfda": "jaxsft.transferability",
    "linear_probe_accuracy": "jaxsft.transferability",
    "knn_accuracy": "jaxsft.transferability",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _SUBPACKAGES:  # `jaxsft.cpu` after a bare `import jaxsft`
        return importlib.import_module(f"jaxsft.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxsft' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__ + list(_SUBPACKAGES))
