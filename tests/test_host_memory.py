"""glibc malloc tuning: which environments get it, and that the CLIs really run under it."""

import json
import os
import subprocess
import sys
import textwrap

from jaxsft.cpu import malloc

TUNED = ":".join(malloc.TUNABLES)


def test_tunables_are_added_once_and_the_users_own_malloc_settings_win():
    assert malloc.tuned_environ({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": TUNED}
    other = {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}
    want = f"glibc.cpu.hwcaps=-AVX512F:{TUNED}"
    assert malloc.tuned_environ(other)["GLIBC_TUNABLES"] == want
    assert malloc.tuned_environ({"GLIBC_TUNABLES": TUNED}) is None  # after re-executing
    assert malloc.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
    assert malloc.tuned_environ({malloc.OPT_OUT: "system"}) is None


# A command-line entry point that reports its pid, its GLIBC_TUNABLES and how many page
# faults re-using a freed 256 MB block costs.
ENTRY_POINT = textwrap.dedent("""
    import ctypes, json, os, resource, sys
    from jaxsft import cli

    def main(argv):
        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        size, faults = 256 << 20, []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(size)
            libc.memset(block, 1, size)
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(json.dumps([os.getpid(), os.environ.get("GLIBC_TUNABLES"), faults[1:],
                          sys.argv[1:]]))

    cli.run(main, prog="probe")
""")


def run_entry_point(env_overrides):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(env_overrides)
    proc = subprocess.Popen([sys.executable, "-c", ENTRY_POINT, "--flag", "x y"], env=env,
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    return (proc.pid, *json.loads(out))


def test_the_entry_point_reexecutes_itself_once_with_freed_memory_kept():
    popen_pid, pid, tunables, faults, argv = run_entry_point({})
    assert pid == popen_pid  # the same process: exec, not a child
    assert tunables == TUNED
    assert argv == ["--flag", "x y"]
    assert max(faults) < 1000  # the freed block is reused: no page is faulted in again


def test_with_the_opt_out_glibc_returns_freed_memory_and_faults_it_in_again():
    _, _, tunables, faults, _ = run_entry_point({malloc.OPT_OUT: "system"})
    assert tunables is None
    assert min(faults) > 60_000  # 256 MB / 4 KiB pages, every time
