"""Assertions shared by the test modules (imported as `helpers`; tests/ is on sys.path)."""

import re
import subprocess
import sys

import jax
import numpy as np


def randomize_batchnorm(model) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics in a torch model."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def assert_trees_close(ours, theirs, rtol: float = 1e-10) -> None:
    """Per leaf: max |ours - theirs| <= rtol * max |theirs| (a relative error per tensor)."""
    flat_ours = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
    flat_theirs = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
    assert flat_ours.keys() == flat_theirs.keys()
    for path, want in flat_theirs.items():
        got, want = np.asarray(flat_ours[path]), np.asarray(want)
        assert got.shape == want.shape, path
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


def fusion_operand_counts(hlo_text: str, op: str, header: str) -> list[int]:
    """Parameter counts of the compiled fusion computations in `hlo_text` that contain an
    instruction matching the regex `op` and whose header line matches the regex `header`.

    A fusion that reads its operand as stored has one parameter per stored array; one that
    recomputes that operand from its producers has more.
    """
    counts = []
    for computation in re.split(r"\n(?=\S)", hlo_text):
        first_line = computation.split("\n", 1)[0]
        if (computation.startswith("%") and re.search(op, computation)
                and re.search(header, first_line)):
            counts.append(len(re.findall(r"\bparameter\(", computation)))
    return counts


def run_module_with_file_size_limit(module: str, *args: str, timeout: int = 600,
                                    limit_kib: int = 8192) -> subprocess.CompletedProcess:
    """`python -m module args` unable to write any file over `limit_kib` KiB (`ulimit -f`): a
    real failed write, e.g. of a ResNet-18 checkpoint (one ~40 MB file), without a full disk."""
    return subprocess.run(["bash", "-c", f'ulimit -f {limit_kib} && exec "$@"', "-",
                           sys.executable, "-m", module, *args],
                          capture_output=True, text=True, timeout=timeout)
