"""Test-wide set-up: 4 virtual CPU devices (before JAX starts), x64 on demand, no network, and
the compilation cache, for this process and its children, in the session's own temporary
directory."""

import os
import tempfile

from fast_compile import FAST_COMPILE

# Multi-device code paths (pmap, sharding) run on the CPU with forced host devices, compiled
# at XLA's backend optimisation level 1 (fast_compile.py: about half the compile time).
# This must happen before JAX initialises its backends, at conftest import time.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the CPU-only tests never claim a GPU

import jaxsft.cpu  # noqa: E402

jaxsft.cpu.configure()  # jaxsft's XLA:CPU flags, as the CLIs set them (import sets nothing)

try:  # torchvision must load before TensorFlow: the other order segfaults (triton) here
    import torchvision  # noqa: E402, F401
except ImportError:
    pass

import jax  # noqa: E402
import pytest  # noqa: E402

# Each test file's seconds in one worker (`pytest --durations=0`, summed per file, on an idle
# 2-core machine at optimisation level 1, 2026-11-30). With `--no-loadscope-reorder`
# (pyproject) xdist hands the files out in collection order, so the heaviest go first and the
# light ones fill the gaps at the end (longest first); xdist's own order (most tests first)
# left a 2-test file running alone for the last minutes. A stale figure costs balance, never
# a test.
FILE_SECONDS = {
    "test_train_e2e.py": 460, "test_safety.py": 220, "test_models.py": 200,
    "test_multihost.py": 185, "test_data.py": 155, "test_benchmarks.py": 140,
    "test_train_recipes.py": 127, "test_selection_experiment.py": 118, "test_parity.py": 115,
    "test_experiments.py": 107, "test_select.py": 61, "test_steps.py": 47,
    "test_convert.py": 37, "test_conv.py": 32, "test_recipes.py": 32, "test_auto_recipe.py": 26,
    "test_parallel.py": 23, "test_weights.py": 23, "test_imprint.py": 16, "test_sweep.py": 15,
    "test_export.py": 12, "test_data_tfds.py": 12, "test_device_cache.py": 10,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: files stay whole


def pytest_configure(config):
    # jaxsft.cpu.configure()'s filter of JAX's warning that an executable calling oneDNN
    # cannot be stored in the compilation cache (see own_tempdir), again for pytest: it
    # imports this file inside warnings.catch_warnings, which drops the filter on leaving.
    # (No ':' in the message: pytest splits the filter there.)
    config.addinivalue_line(
        "filterwarnings", "ignore:Error writing persistent compilation cache entry for "
        "'[^']*'. MemoryError. std..bad_alloc:UserWarning")


@pytest.fixture
def x64():
    """Float64 semantics for one test: where two correct implementations agree to ~1e-15."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session", autouse=True)
def own_tempdir(tmp_path_factory):
    """Python's temporary files, the tests' and their child processes', in one directory
    removed at the end: TFDS leaves an empty `/tmp/tmp*tfds` whenever it builds a data set
    that is not prepared yet (it looks for the metadata online)."""
    tmp_path_factory.getbasetemp()  # pytest's own base stays where it was, failures kept
    with (tempfile.TemporaryDirectory(prefix="jaxsft-tests-") as path,
          pytest.MonkeyPatch.context() as patch):
        patch.setenv("TMPDIR", path)
        patch.setattr(tempfile, "tempdir", path)
        # The compilation cache and downloads ($JAXSFT_CACHE) of this session and its child
        # processes: never the user's ~/.cache/jaxsft. Shared within the session, so a child
        # process loads what an earlier one compiled.
        patch.setenv("JAXSFT_CACHE", os.path.join(path, "jaxsft-cache"))
        # This process uses that cache too (as every CLI does): the tests' fits of one model
        # share one compiled random init (a resnet18's took ~80 s to compile on a loaded
        # 2-core machine, 2 s to load). XLA:CPU's oneDNN steps cannot be stored: compiled
        # each time, as in the CLIs.
        from jaxsft.compilation_cache import default_cache_dir, enable_compilation_cache

        enable_compilation_cache(default_cache_dir())
        yield


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch's spinning worker threads fight XLA's for 2 cores; one thread is ~5x faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
