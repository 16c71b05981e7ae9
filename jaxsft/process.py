"""`jaxsft.setup()`: the process-wide settings every `python -m jaxsft.X` makes, in one call.

Importing jaxsft changes nothing in its host program. A program that wants what the CLIs get
calls `jaxsft.setup()` once, before its first JAX computation:

- XLA:CPU's speed flags and the oneDNN cache-warning filter (`jaxsft.cpu.configure`): XLA reads
  its flags when JAX starts its first backend, so they count only before that;
- TensorFlow's and TFDS's start-up noise silenced (`jaxsft.data.quiet_tensorflow`), before
  TensorFlow starts;
- Orbax's repeated warnings and tracebacks after a failed write dropped
  (`jaxsft.checkpoint.quiet_orbax`);
- JAX's persistent compilation cache in $JAXSFT_CACHE/jax-cache (else ~/.cache/jaxsft), so a
  repeated run loads its compiled steps from disk (`jaxsft.compilation_cache`).

JAX's x64 mode is not among them: it changes what every later computation means, so the CLIs
turn it on only for a float64 config (`--dtype float64`), and a library user turns it on with
`jax.config.update("jax_enable_x64", True)`. The CLIs also re-execute themselves once with
glibc's malloc tuned for XLA's buffers (`jaxsft.cpu.reexec_with_tuned_malloc`), which only a
process's own entry point can do.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["setup"]


def setup(*, compilation_cache: bool = True) -> Path | None:
    """Makes the CLIs' process-wide settings (module docstring); returns the compilation
    cache's directory, or None with `compilation_cache=False`. Calling it again is harmless."""
    from jaxsft.data import quiet_tensorflow

    quiet_tensorflow()  # first: importing JAX sets TensorFlow's log level to its own default
    from jaxsft import checkpoint, cpu

    cpu.configure()
    checkpoint.quiet_orbax()
    if not compilation_cache:
        return None
    from jaxsft.compilation_cache import enable_compilation_cache

    return enable_compilation_cache()
