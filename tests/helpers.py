"""Assertions and generated data shared by the test modules (imported as `helpers`; tests/
is on sys.path)."""

import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from fast_compile import FAST_COMPILE
from PIL import Image

from jaxsft import data
from jaxsft.config import DataConfig


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


# ------------------------------------------------------------------ generated image folders

def image_folder(root: Path, counts: dict[str, int], classes: Sequence[str],
                 draw: Callable[[str, np.random.Generator], np.ndarray], seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png: `counts[split]` images per class, each `draw(class,
    rng)` from one generator seeded `seed` (split by split, class by class, in order)."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(draw(name, rng)).save(root / split / name / f"{i}.png")
    return root


def noise(_: str, rng: np.random.Generator) -> np.ndarray:
    """16x16 uniform noise whatever the class: well-conditioned BatchNorm statistics."""
    return rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)


SHAPES = ("circle", "square", "stripes")


def shape(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A bright circle, square or stripes on dark 24x24 noise."""
    img = rng.integers(0, 60, (24, 24, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:24, :24]
    if kind == "circle":
        img[(yy - 12) ** 2 + (xx - 12) ** 2 < 60] = 230
    elif kind == "square":
        img[6:18, 6:18] = 230
    else:
        img[::4] = 230
    return img


def shapes_folder(root: Path) -> Path:
    """root/{train,test}/<shape>/*.png: 12 train and 5 test images per class of SHAPES."""
    return image_folder(root, {"train": 12, "test": 5}, SHAPES, shape)


# ------------------------------------------------------------- the stream on any topology

def global_batches(cfg: DataConfig, processes: int, devices: int, steps: int, start: int = 0,
                   seed: int = 7) -> list[dict]:
    """Global batches start.. as `processes` processes of `devices` devices read them,
    concatenated in process then device order."""
    its = [data._train_batches(cfg, seed=seed, start_step=start, num_devices=devices,
                               process_index=p, process_count=processes)
           for p in range(processes)]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its]
        out.append({k: np.concatenate([b[k].reshape(-1, *b[k].shape[2:]) for b in parts])
                    for k in parts[0]})
    return out


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(g[key], w[key])


def check_topology_invariance(cfg: DataConfig, steps: int) -> list[dict]:
    """1x4 == 2x2 == 1x1 == 4x1 bit for bit over `steps`; resuming at any step, on another
    number of processes, continues the same stream."""
    one = global_batches(cfg, 1, 4, steps)
    for processes, devices in ((2, 2), (1, 1), (4, 1)):
        assert_same_batches(global_batches(cfg, processes, devices, steps), one)
    for start, processes in ((1, 2), (steps // 2, 4), (steps - 1, 1)):
        assert_same_batches(global_batches(cfg, processes, 4 // processes, steps - start,
                                           start=start), one[start:])
    return one




def run_quick_experiment(module: str, tmp_path: Path) -> Path:
    """`python -m <module> --quick` from the repository root, as a user runs it (one CPU
    device: conftest's forced 4 dropped; FAST_COMPILE kept), runs in tmp_path/runs; returns
    tmp_path/res."""
    import os

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "XLA_FLAGS": FAST_COMPILE}
    subprocess.run([sys.executable, "-m", module, "--quick", "--workdir", str(tmp_path / "runs"),
                    "--results", str(tmp_path / "res")], cwd=root, env=env, check=True,
                   timeout=900)
    return tmp_path / "res"
