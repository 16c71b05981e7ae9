"""Input-pipeline throughput of jaxsft.data: JPEG decode + augmentation, images/s.

    python -m benchmarks.input_pipeline                      # 224x224, imagenet augmentation
    python -m benchmarks.input_pipeline --augment light --json benchmarks/results/input.json
    python -m benchmarks.input_pipeline --paths device-cache # no TensorFlow

Writes --images photo-like JPEGs (ImageNet-like sizes: 500x375, 375x500, 500x333, 640x480;
quality 90) into a temporary image folder, then times, after --warmup batches, --batches
batches of `jaxsft.data.train_batches` (decode, RandomResizedCrop, flip, normalise, batch, as
numpy [devices, per_device, H, W, 3]) and one pass of the eval pipeline (decode, resize,
centre crop, normalise) over the same files. Only the host side is measured: no device
transfer, no model. A training step that takes longer per batch than this pipeline needs
never waits for data; compare with benchmarks/throughput.py's images/s. The CPU time per
image (all threads) is reported too: on a shared machine it is the steadier figure, and
cores / (CPU s per image) bounds what the whole machine can feed.

`--paths device-cache` (or `tfdata,device-cache`, the default) also times the cached path
(jaxsft.data.device_cache): the same JPEGs decoded once with PIL into uint8 squares of
--stored pixels (its one-off cost reported as `device_cache_build_s`), then batches of the
sampler's examples augmented by JAX on the default device (RandomResizedCrop, flip, normalise;
each batch waited for). On the CPU that is XLA:CPU doing the augmentation; on a GPU, the
accelerator. Only `--augment imagenet` exists there.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.throughput import cpu_model

SIZES = ((375, 500), (500, 375), (333, 500), (480, 640))


def photo(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour fields, edges and noise: JPEG-compresses like a photo, not like noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    f = rng.uniform(2, 9, 3)
    base = np.stack([np.sin(f[0] * x + 3 * y), np.cos(f[1] * y - 2 * x), np.sin(f[2] * (x + y))],
                    -1)
    image = 120 + 70 * base + (x > rng.uniform())[..., None] * 50 + rng.normal(0, 6, base.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_folder(root: Path, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(exist_ok=True)
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray(photo(h, w, rng)).save(folder / f"{i:05d}.jpg", quality=90)


def time_batches(batches, warmup: int, count: int, batch_size: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) over `count` batches after `warmup` (the first builds
    the pipeline). CPU time counts every thread of this process, so on a shared machine
    1000 / (ms per image) is the images/s one fully available core would give."""
    for _ in range(warmup):
        next(batches)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(batches)
    images = count * batch_size
    return (images / (time.perf_counter() - start),
            1000 * (time.process_time() - cpu) / images)


def time_device_cache(root: Path, size: int, stored: int, batch_size: int, warmup: int,
                      count: int, seed: int = 0) -> dict:
    """Decode the folder once into a device cache, then time its augmented batches."""
    import jax

    from jaxsft.data import device_cache as dc

    files = sorted(root.glob("*/*.jpg"))
    start, cpu = time.perf_counter(), time.process_time()
    images = (np.asarray(Image.open(f).convert("RGB")) for f in files)
    cache = dc.build_cache(images, [int(f.parent.name[5:]) for f in files], stored,
                           device=jax.devices()[0])
    jax.block_until_ready(cache.images)
    build = time.perf_counter() - start
    build_cpu = 1000 * (time.process_time() - cpu) / len(files)

    def batches():
        for b in dc.train_batches(cache, batch_size, seed, size):
            yield b["image"].block_until_ready()

    rate, cpu_ms = time_batches(batches(), warmup, count, batch_size)
    return {
        "device_cache_train_images_per_s": round(rate, 1),
        "device_cache_cpu_ms_per_image": round(cpu_ms, 2),
        "device_cache_build_s": round(build, 2),
        "device_cache_build_cpu_ms_per_image": round(build_cpu, 2),
        "device_cache_stored": stored,
        "device_cache_bytes": int(cache.images.nbytes),
        "device_cache_device": str(jax.devices()[0].device_kind),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="JPEGs to generate")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", default="imagenet", choices=("imagenet", "light", "none"))
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--batches", type=int, default=20, help="timed train batches")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--paths", default="tfdata,device-cache",
                        help="comma-separated: tfdata, device-cache")
    parser.add_argument("--stored", type=int, default=None,
                        help="device cache: stored square side (default: 8/7 x image size)")
    args = parser.parse_args(argv)
    paths = {p.strip() for p in args.paths.split(",") if p.strip()}
    if not paths or paths - {"tfdata", "device-cache"}:
        parser.error(f"--paths: choose from tfdata, device-cache; got {args.paths!r}")
    if args.augment != "imagenet" and "device-cache" in paths:
        if paths == {"device-cache"}:
            parser.error("--paths device-cache: only --augment imagenet runs on the device")
        paths.discard("device-cache")

    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.images)
        if "tfdata" in paths:
            result.update(time_tfdata(tmp, args))
        if "device-cache" in paths:
            stored = args.stored or round(args.image_size * 8 / 7)
            result.update(time_device_cache(Path(tmp), args.image_size, stored,
                                            args.batch_size, args.warmup, args.batches))
    result.update({
        "augment": args.augment, "image_size": args.image_size, "batch_size": args.batch_size,
        "images": args.images,
        "source_sizes": [f"{w}x{h}" for h, w in SIZES], "jpeg_quality": 90,
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    })
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def time_tfdata(folder: str, args: argparse.Namespace) -> dict:
    """jaxsft.data's tf.data training and eval pipelines over the folder."""
    from jaxsft import data
    from jaxsft.config import DataConfig

    cfg = DataConfig(dataset=f"folder:{folder}", image_size=args.image_size,
                     batch_size=args.batch_size, augment=args.augment, eval_split="train")
    train, train_cpu = time_batches(data.train_batches(cfg, seed=0, num_devices=1),
                                    args.warmup, args.batches, args.batch_size)
    eval_count = data.steps_per_epoch(data.dataset_info(cfg), cfg) - 1
    evals, eval_cpu = time_batches(data.eval_batches(cfg, num_devices=1), 1, eval_count,
                                   args.batch_size)
    import tensorflow as tf

    return {
        "train_images_per_s": round(train, 1),
        "eval_images_per_s": round(evals, 1),
        "train_cpu_ms_per_image": round(train_cpu, 2),
        "eval_cpu_ms_per_image": round(eval_cpu, 2),
        "tensorflow": tf.__version__,
    }


if __name__ == "__main__":
    main()
