"""Peak dense FLOP/s of common accelerators, for MFU (model FLOPs utilisation).

Vendor datasheet figures per JAX device, dense (no 2:4 sparsity), in TFLOP/s. "bf16" is the
tensor-core / MXU rate; "fp32" is the rate an fp32 convolution runs at under each framework's
*default* precision: on NVIDIA Ampere and later both XLA and cuDNN (torch's default
`cudnn.allow_tf32=True`) use TF32 tensor cores, so the TF32 figure is the honest ceiling; on
TPUs the default precision runs fp32 matrix products as one bf16 pass on the MXU. A device or
dtype missing here gives no MFU unless `--peak-tflops` is passed; a peak is a ceiling, not a
measurement (the H200 machine lent to this project measured about 790 TFLOP/s on an 8192^3
bf16 matmul, against the 989 listed).
"""

from __future__ import annotations

# (substring of jax's device_kind, lower-cased; peaks). The first match wins, so the more
# specific names (H100 PCIe) come before the general ones (H100).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # NVIDIA Blackwell / Hopper / Ada / Ampere / Volta (SXM unless named)
    ("b200", {"bf16": 2250.0, "fp32": 1100.0}),
    ("h100 pcie", {"bf16": 756.0, "fp32": 378.0}),
    ("h100 nvl", {"bf16": 835.0, "fp32": 418.0}),
    ("gh200", {"bf16": 989.4, "fp32": 494.7}),
    ("h200", {"bf16": 989.4, "fp32": 494.7}),
    ("h100", {"bf16": 989.4, "fp32": 494.7}),
    ("h800", {"bf16": 989.4, "fp32": 494.7}),
    ("l40s", {"bf16": 362.1, "fp32": 183.0}),
    ("l4", {"bf16": 121.0, "fp32": 60.0}),
    ("a100", {"bf16": 312.0, "fp32": 156.0}),
    ("a800", {"bf16": 312.0, "fp32": 156.0}),
    # V100 has no bf16 tensor cores (125 is its fp16 rate) and no TF32.
    ("v100", {"fp16": 125.0, "fp32": 15.7}),
    # Google TPUs, per JAX device. v2 and v3 show one device per core (half a chip);
    # v4 and later one per chip (megacore).
    ("tpu v6 lite", {"bf16": 918.0, "fp32": 918.0}),
    ("tpu v6e", {"bf16": 918.0, "fp32": 918.0}),
    ("tpu v5 lite", {"bf16": 197.0, "fp32": 197.0}),
    ("tpu v5e", {"bf16": 197.0, "fp32": 197.0}),
    ("tpu v5p", {"bf16": 459.0, "fp32": 459.0}),
    ("tpu v5", {"bf16": 459.0, "fp32": 459.0}),
    ("tpu v4", {"bf16": 275.0, "fp32": 275.0}),
    ("tpu v3", {"bf16": 61.5, "fp32": 61.5}),
    ("tpu v2", {"bf16": 22.5, "fp32": 22.5}),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The table's peak for this device kind and dtype ("bf16" or "fp32"), or None."""
    kind = device_kind.lower()
    for needle, peaks in PEAK_TFLOPS:
        if needle in kind:
            return peaks.get(dtype)
    return None
