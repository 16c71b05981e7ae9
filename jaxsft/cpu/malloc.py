"""glibc malloc settings that stop XLA:CPU from page-faulting its buffers on every step.

XLA:CPU mallocs each execution's temporary buffers (gigabytes for a ResNet step) and frees them
afterwards. glibc serves blocks over 32 MB with fresh mmaps and hands a freed heap top back to
the kernel, so every step faults every page in again: ~570k minor faults and ~0.9 s of kernel
time per ResNet-50 step (batch 16) on a 2-core machine. Keeping freed memory in the process
(no mmap for large blocks, no trimming, one arena shared by all threads) removes them all and
makes that step ~1.3x faster (benchmarks/cpu_notes.md). The price: the process keeps its peak
heap until it exits, as caching allocators do; a training process reuses it every step.

glibc reads these settings (GLIBC_TUNABLES) only when a process starts, so the command-line
entry points re-execute themselves once with them set, before importing JAX. Set
JAXSFT_MALLOC=system to keep glibc's defaults; a GLIBC_TUNABLES that already names a
glibc.malloc setting is left as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=18446744073709551615",
            "glibc.malloc.arena_max=1")
OPT_OUT = "JAXSFT_MALLOC"  # "system": glibc's defaults


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to change."""
    if environ.get(OPT_OUT, "").lower() == "system" or not _is_glibc():
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in current:
        return None  # the user's (or ours, after the re-execution)
    tunables = ":".join(filter(None, (current, *TUNABLES)))
    return {**environ, "GLIBC_TUNABLES": tunables}


def reexec_with_tuned_malloc() -> None:
    """Replaces this process (same pid, arguments and streams) by one with TUNABLES in effect;
    returns without doing anything where they are set already or do not apply."""
    environ = tuned_environ(os.environ)
    argv = getattr(sys, "orig_argv", None)
    if environ is None or not argv or not sys.executable:
        return  # nothing to change, or no way to start the same command again
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], environ)
    except OSError:
        pass  # could not re-execute: run on with glibc's defaults (slower, same results)


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # e.g. "glibc 2.36"
    except (AttributeError, ValueError, OSError):  # not Linux/glibc
        return False
