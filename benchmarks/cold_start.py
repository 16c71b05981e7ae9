"""Cold start: the compile time of jaxsft's train step, and one lever that may cut it.

    python -m benchmarks.cold_start --model resnet50 --image-size 224 --batch 8 \\
        --json benchmarks/results/cold-start-cpu.json

Each variant runs in a fresh process with no persistent compilation cache: lower and compile
of the train step (the seed's SGD, plain Flax convolutions, BatchNorm in training mode, jit
on one device), then a few timed steps. Variants:
- "plain": jaxsft.models' ResNet as it is (every block unrolled in the HLO);
- "scan": a prototype (this file only; jaxsft.models is untouched) with the same layers and
  parameters, where the identical blocks of each stage (all but its first) run under
  `nn.scan`: one block body per stage in the HLO (ResNet-50: 4 bodies for 12 blocks),
  a while loop at run time. Lever F of gpu-leads.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxsft.models import resnet as R


class _Repeated(nn.Module):
    """One residual block as a scan body: (carry, _) -> (block(carry), None)."""

    block: type[nn.Module]
    planes: int
    dtype: Any
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return self.block(self.planes, 1, dtype=self.dtype, train=self.train,
                          name="block")(x), None


class ScannedResNet(nn.Module):
    """jaxsft's ResNet with blocks 1.. of every stage under nn.scan (parameters stacked)."""

    block: type[nn.Module]
    layers: tuple[int, ...]
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = R._layers(nn.Conv, self.dtype, train, None, R.TORCH_BN_MOMENTUM)
        x = x.astype(self.dtype)
        x = nn.relu(norm(name="bn1")(conv(64, 7, 2, name="conv1")(x)))
        x = R.max_pool(x, window=3, stride=2, padding=1)
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers), 1):
            stride = 2 if stage > 1 else 1
            x = self.block(planes, stride, dtype=self.dtype, train=train,
                           name=f"layer{stage}_0")(x)
            if blocks > 1:
                scanned = nn.scan(_Repeated, variable_axes={"params": 0, "batch_stats": 0},
                                  split_rngs={"params": True}, length=blocks - 1)
                x, _ = scanned(self.block, planes, self.dtype, train,
                               name=f"layer{stage}_rest")(x, None)
        x = x.mean(axis=(1, 2))
        x = R.classifier(self.num_classes, x.shape[-1], self.dtype)(x)
        return x.astype(jnp.float32)


def make_model(arch: str, variant: str, num_classes: int, dtype: Any) -> nn.Module:
    from jaxsft import create_model
    from jaxsft.models import ARCHITECTURES

    if variant == "plain":
        return create_model(arch, num_classes=num_classes, dtype=dtype)
    spec = ARCHITECTURES[arch]
    return ScannedResNet(spec["block"], tuple(spec["layers"]), num_classes, dtype)


def run_variant(arch: str, variant: str, size: int, batch: int, steps: int,
                dtype: Any = jnp.float32) -> dict[str, Any]:
    """Compile (lower, compile) and time one variant's train step in this process."""
    import optax

    from jaxsft import TrainState, train_step

    model = make_model(arch, variant, 1000, dtype)
    x = jnp.zeros((batch, size, size, 3), jnp.float32)
    t0 = time.perf_counter()
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0, impl="rbg"), x[:1])
    init_s = time.perf_counter() - t0
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"],
                              tx=optax.sgd(0.01, momentum=0.9))
    batch_ = {"image": jax.random.normal(jax.random.key(1), x.shape),
              "label": jnp.zeros((batch,), jnp.int32)}
    step = jax.jit(functools.partial(train_step, bn_mode="train"), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = step.lower(state, batch_)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state, m = compiled(state, batch_)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch_)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    return {
        "variant": variant, "model": arch, "image_size": size, "batch": batch,
        "init_s": round(init_s, 2), "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2), "hlo_lines": compiled.as_text().count("\n"),
        "step_s": [round(t, 3) for t in times], "median_step_s": float(np.median(times)),
        "params": params, "loss": float(m["loss"]),
        "backend": jax.default_backend(), "load_average": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", default="plain,scan")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_variant(a.model, a.variants, a.image_size, a.batch, a.steps)))
        return 0
    results = []
    for v in a.variants.split(","):
        cmd = [sys.executable, "-m", "benchmarks.cold_start", "--one", "--variants", v,
               "--model", a.model, "--image-size", str(a.image_size),
               "--batch", str(a.batch), "--steps", str(a.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{v}: lower {r['lower_s']} s, compile {r['compile_s']} s, step "
              f"{r['median_step_s']:.3f} s, {r['params']} params, {r['hlo_lines']} HLO lines",
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"command": "python -m benchmarks.cold_start "
                                            + " ".join(argv or sys.argv[1:]),
                                            "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
