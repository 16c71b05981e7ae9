"""What every `python -m jaxsft.X` shares: user errors become one line and exit status 2."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the user can fix this': printed as one line, never a traceback."""
    from jaxsft.checkpoint import CheckpointError
    from jaxsft.config import ConfigError
    from jaxsft.data import DataError
    from jaxsft.weights import WeightsError

    return ConfigError, DataError, WeightsError, CheckpointError


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None,
        *, prog: str) -> None:
    """Runs `main(argv)` and exits: 0 ok, 1 training failed, 2 user error, 128+N signal N."""
    from jaxsft.trainer import Preempted, TrainingError

    try:
        main(argv)
    except user_errors() as e:
        _die(prog, str(e), 2)
    except TrainingError as e:
        _die(prog, str(e), 1)
    except Preempted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(128 + signal.Signals[e.signal_name].value)
    except KeyboardInterrupt:
        _die(prog, "interrupted", 128 + signal.SIGINT.value)
    sys.exit(0)


def _die(prog: str, message: str, code: int) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)
