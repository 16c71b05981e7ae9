"""When a periodic action (log, evaluate, save, close an epoch) is due: one small predicate.

big_vision's `itstime` and clu's periodic actions, reduced to what the train loop needs: each
action runs every N steps and after the last step, so the loop asks one question per action
instead of threading step arithmetic through its body.
"""

from __future__ import annotations

__all__ = ["is_time"]


def is_time(step: int, every: int | None, total: int) -> bool:
    """Whether an action due every `every` steps (None: never) runs after `step` (1-based)
    of a `total`-step run; it always runs after the last step."""
    return step == total or bool(every) and step % every == 0
