"""The seed's PyTorch training loop on torchvision's model: the baseline jaxsft is timed against.

The seed's loop is `model.train()`, `CrossEntropyLoss()`, `SGD(lr=0.01, momentum=0.9)` and
`zero_grad(); loss = criterion(model(x), y); loss.backward(); step()`. Variants:

- "torch": exactly that, fp32, NCHW (the seed as written).
- "torch-cl": channels_last memory format (the usual CPU speed-up, oneDNN's preferred layout).
- "torch-amp-cl": autocast to bf16 plus channels_last, torch's best ordinary form on a GPU.
- "torch-compile": "torch" with the model and loss under `torch.compile` (default mode:
  TorchInductor, no CUDA graphs): AOTAutograd compiles the forward and the backward, the
  optimizer step stays the seed's eager SGD.
- "torch-compile-amp-cl": "torch-amp-cl" under `torch.compile` the same way (CUDA only).
The compiled variants compile on their first step; `compile_s` reports that first step's
time (compilation, and on CUDA cuDNN's benchmark search, plus one step), beside jaxsft's.

torch is imported only when a loop is built, so the JAX benchmark runs where torch is absent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Any

VARIANTS = ("torch", "torch-cl", "torch-amp-cl", "torch-compile", "torch-compile-amp-cl")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool
    amp_bf16: bool
    compiled: bool = False


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown torch variant {name!r}; choose from {', '.join(VARIANTS)}")
    amp = name.endswith("amp-cl")
    return Variant(name, channels_last=name not in ("torch", "torch-compile"), amp_bf16=amp,
                   compiled=name.startswith("torch-compile"))


def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))


def default_variants(device_type: str) -> tuple[str, ...]:
    """fp32 as the seed wrote it, plus the best ordinary form for the device."""
    return ("torch", "torch-amp-cl") if device_type == "cuda" else ("torch", "torch-cl")


class TorchLoop:
    """One variant of the seed's loop on synthetic on-device data of fixed shapes."""

    def __init__(self, name: str, *, model: str, num_classes: int, image_size: int,
                 batch_size: int, bn_mode: str, lr: float, momentum: float, device: str,
                 seed: int = 0, compile_backend: str = "inductor") -> None:
        import torch
        import torchvision

        self.name = name
        self.variant = variant(name)
        if self.variant.amp_bf16 and device != "cuda":
            raise ValueError(f"{name} needs a CUDA device; on {device} use torch or torch-cl")
        self._torch = torch
        self.device = torch.device(device)
        if device == "cuda":
            torch.backends.cudnn.benchmark = True  # what a tuned seed loop would set
        torch.manual_seed(seed)
        fmt = torch.channels_last if self.variant.channels_last else torch.contiguous_format
        net = torchvision.models.get_model(model, weights=None, num_classes=num_classes)
        self.model = net.to(self.device, memory_format=fmt)
        self.model.train()
        if bn_mode == "frozen":  # running statistics, as jaxsft's bn_mode="frozen"
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self.criterion = torch.nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
        self.images = x.to(self.device).contiguous(memory_format=fmt)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(self.device)
        self._loss: Any = None
        self._forward = self._loss_of
        self.compile_s: float | None = None
        self.compile_backend = compile_backend  # "inductor"; tests use "aot_eager"
        if self.variant.compiled:
            self._forward = torch.compile(self._loss_of, backend=compile_backend)
            t0 = time.perf_counter()
            self.step(sync=True)  # torch.compile compiles on the first call
            self.compile_s = time.perf_counter() - t0

    def _loss_of(self, images: Any, labels: Any) -> Any:
        with self._torch.autocast(self.device.type, dtype=self._torch.bfloat16,
                                  enabled=self.variant.amp_bf16):
            return self.criterion(self.model(images), labels)

    def step(self, sync: bool = True) -> None:
        """One step of the seed's loop; with `sync`, returns when the device is done."""
        self.optimizer.zero_grad()
        loss = self._forward(self.images, self.labels)
        loss.backward()
        self.optimizer.step()
        self._loss = loss.detach()
        if sync:
            self.sync()

    def sync(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def loss(self) -> float:
        return float(self._loss) if self._loss is not None else float("nan")

    def peak_memory_bytes(self) -> int | None:
        """Peak bytes the CUDA caching allocator held for tensors; None on the CPU."""
        if self.device.type != "cuda":
            return None
        return int(self._torch.cuda.max_memory_allocated(self.device))

    def describe(self) -> dict[str, Any]:
        torch = self._torch
        out: dict[str, Any] = {
            "device": str(self.device),
            "channels_last": self.variant.channels_last,
            "amp": "bf16" if self.variant.amp_bf16 else None,
            "dtype": "bf16" if self.variant.amp_bf16 else "fp32",
            "threads": torch.get_num_threads(),
        }
        if self.variant.compiled:
            out["torch_compile"] = (f"backend {self.compile_backend}, default mode; model "
                                    "+ loss compiled, eager SGD")
            out["compile_s"] = self.compile_s
            out["compilation_cache"] = "torch-inductor"
        if self.device.type == "cuda":
            out["cudnn_benchmark"] = True
            out["tf32_conv"] = bool(torch.backends.cudnn.allow_tf32)
            out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        return out
