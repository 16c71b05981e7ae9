"""What every `python -m jaxsft.X` shares: user errors become one line and exit status 2."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence

from jaxsft import cpu
from jaxsft.config import ConfigError
from jaxsft.process import setup


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the user can fix this': printed as one line, never a traceback."""
    from jaxsft.checkpoint import CheckpointError
    from jaxsft.data import DataError
    from jaxsft.weights import WeightsError

    return ConfigError, DataError, WeightsError, CheckpointError


def exit_code(error: BaseException) -> int | None:
    """0 ok, 1 training failed, 2 user error, 128+N stopped by signal N; None: a bug."""
    if isinstance(error, ConfigError):  # checked first: a bad flag fails before JAX loads
        return 2
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT.value
    from jaxsft.trainer import Preempted, TrainingError

    if isinstance(error, Preempted):
        return 128 + signal.Signals[error.signal_name].value
    if isinstance(error, TrainingError):
        return 1
    from jaxsft.checkpoint import NO_ROOM

    if isinstance(error, OSError) and error.errno in NO_ROOM:
        return 2  # a full disk (metrics, plots, exported files): the message names the path
    return 2 if isinstance(error, user_errors()) else None


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None,
        *, prog: str) -> None:
    """Runs `main(argv)` and exits with `exit_code`; unexpected errors keep their traceback.

    On the real command line (argv None) the process first re-executes itself with glibc's
    malloc tuned for XLA's buffers (jaxsft.cpu.reexec_with_tuned_malloc). Then it makes the
    process-wide settings of `jaxsft.setup()` before `main` starts JAX.
    """
    if argv is None:
        cpu.reexec_with_tuned_malloc()
    setup()
    try:
        main(argv)
    except (Exception, KeyboardInterrupt) as e:
        code = exit_code(e)
        if code is None:
            raise
        label = "stopped" if code > 128 else "error"
        text = getattr(e, "cli_message", None) or e  # the command line's words, if different
        print(f"{prog}: {label}: {text or type(e).__name__}", file=sys.stderr)
        sys.exit(code)
    sys.exit(0)


def use_dtype(dtype: str) -> None:
    """A float64 run computes in JAX's x64 mode: a process-wide switch, so the CLI (not the
    library) turns it on, before JAX computes anything."""
    if dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
