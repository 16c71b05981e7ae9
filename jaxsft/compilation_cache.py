"""JAX's persistent compilation cache, in the user's cache directory.

A ResNet-50 train step takes tens of seconds to compile (minutes on a small CPU); with the
cache a repeated run with the same shapes, flags and library versions loads the executable
from disk instead. Any entry point can call `enable_compilation_cache()` once, before its
first compilation.

XLA:CPU cannot store executables that call oneDNN (the CPU's float32 steps): those compile
again each run (see `jaxsft.cpu.onednn`).

`release_compiled()` frees the in-memory side between the runs of a process that trains many
(a sweep, a benchmark's cells).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "JAXSFT_CACHE"  # the same root as downloaded weights (jaxsft.weights)


def default_cache_dir() -> Path:
    """$JAXSFT_CACHE/jax-cache, else ~/.cache/jaxsft/jax-cache."""
    root = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "jaxsft"
    return Path(root).expanduser() / "jax-cache"


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache and returns its directory.

    An explicit `cache_dir` wins; otherwise a directory the user already configured for JAX
    (JAX_COMPILATION_CACHE_DIR) is kept; otherwise `default_cache_dir()`. Call it before the
    first compilation: JAX decides once, at its first compile, whether the cache is in use.
    """
    configured = jax.config.jax_compilation_cache_dir
    if cache_dir is None and configured:
        path = Path(configured)
    else:
        path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def cache_entries(cache_dir: str | os.PathLike | None) -> int:
    """Files in the cache directory: a compile that adds none to a warm cache was a hit."""
    if cache_dir is None or not Path(cache_dir).is_dir():
        return 0
    return sum(1 for p in Path(cache_dir).rglob("*") if p.is_file())


def release_compiled() -> None:
    """Frees every program JAX has compiled in this process. JAX's staging caches keep each
    `fit`'s (its closures are new every run): ~660 memory maps per ResNet-18 run on XLA:CPU,
    so a process of ~90 runs reaches the kernel's limit (vm.max_map_count, 65,530) and LLVM
    fails with "Cannot allocate memory". Call it between runs, not inside a library user's
    loop for them: it also drops the caller's own compiled functions. The persistent cache
    makes the next run's compile a load (~3 s for a ResNet-18 cell here)."""
    jax.clear_caches()
