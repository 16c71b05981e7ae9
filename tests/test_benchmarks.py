"""Smoke tests of the benchmark harness (benchmarks/): it runs, and its figures are computed
from what it measured. Nothing here asserts a timing: the machine is shared."""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks import flops, peaks, scaling, throughput, torch_loop
from jaxsft import compilation_cache as cache

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """`python -m benchmarks.throughput --quick` in a fresh process, its JSON parsed."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--quick", "--no-cache",
           "--cpu-threads", "1", "--peak-tflops", "1.0", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # its own, not the tests'
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**env, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "jaxsft" in proc.stdout and "torch" in proc.stdout  # the printed table
    return json.loads(out.read_text())


def test_quick_mode_writes_the_documented_fields(quick):
    for key in ("command", "date", "settings", "hardware", "versions", "results", "ratios",
                "notes", "load_average"):
        assert key in quick
    assert quick["command"].startswith("python -m benchmarks.throughput --quick")
    assert quick["settings"]["model"] == "resnet18" and quick["settings"]["image_size"] == 64
    assert quick["hardware"]["platform"] == "cpu"
    assert quick["versions"]["jax"] and quick["versions"]["torch"]
    # It set jaxsft's XLA:CPU flags itself (jaxsft.cpu.configure), as the CLIs do.
    assert "--xla_cpu_use_fusion_emitters=false" in quick["versions"]["XLA_FLAGS"]
    # The synthetic path runs where TensorFlow is absent: it never imports it.
    assert quick["imported_tensorflow"] is False
    assert list(quick["results"]) == ["jaxsft", "torch", "torch-cl"]
    # --cpu-threads 1 pinned the process before either framework sized its thread pool.
    assert quick["hardware"]["cpu_cores_usable"] == 1
    assert all(quick["results"][n]["threads"] == 1 for n in ("torch", "torch-cl"))
    jax_r = quick["results"]["jaxsft"]
    assert jax_r["compile_s"] > 0 and jax_r["lower_s"] > 0
    assert jax_r["compilation_cache"] == "off"
    assert jax_r["compiled_memory_bytes"]["argument"] > 0
    for r in quick["results"].values():
        assert r["ms_per_step"]["n"] == quick["settings"]["steps"]
        assert len(r["ms_per_step_per_round"]) == quick["settings"]["rounds"]
        assert r["last_loss"] == r["last_loss"]  # finite training, not NaN
        # Host cost per step (kernel time, page faults), recorded for every runner.
        assert r["system_ms_per_step"] >= 0 and r["minor_faults_per_step"] >= 0


class FaultingRunner:
    """A runner whose first `growing` steps page-fault like a growing heap, then none."""

    def __init__(self, name: str, growing: int, usage: types.SimpleNamespace):
        self.name, self.growing, self.steps, self.usage = name, growing, 0, usage

    def step(self, sync: bool = True) -> None:
        self.steps += 1
        if self.steps <= self.growing:
            self.usage.ru_minflt += 4 * throughput.QUIET_FAULTS

    def sync(self) -> None:
        pass


@pytest.mark.parametrize("warmup, growing, expected", [
    (1, 3, 8),  # blocks of a round (2 steps) past --warmup, until two in a row are quiet
    (2, 0, 2),  # a quiet heap: exactly --warmup
    (3, 0, 4),  # whole blocks
    (1, 100, 2 * throughput.MAX_WARMUP),  # never quiet: capped
    (0, 3, 0),  # --warmup 0: none at all
])
def test_warm_up_alternates_until_the_shared_heap_stops_growing(warmup, growing, expected,
                                                                 monkeypatch):
    usage = types.SimpleNamespace(ru_minflt=0, ru_stime=0.0)  # the process's, as faked
    monkeypatch.setattr(throughput.resource, "getrusage", lambda _: copy.copy(usage))
    runners = [FaultingRunner("a", growing, usage), FaultingRunner("b", 0, usage)]
    host = {}
    throughput.measure(runners, throughput.Settings(steps=2, rounds=1, warmup=warmup),
                       say=lambda *_: None, host=host)
    assert [r.steps for r in runners] == [expected + 2] * 2  # warm-up + one round of 2
    assert host["a"]["warmup_steps"] == host["b"]["warmup_steps"] == expected


def test_figures_follow_from_the_measured_times(quick):
    s = quick["settings"]
    for r in quick["results"].values():
        ms = r["ms_per_step"]
        assert ms["min"] <= ms["q1"] <= ms["median"] <= ms["q3"] <= ms["max"]
        assert r["images_per_s"] == pytest.approx(s["batch_size"] / (ms["median"] / 1e3))
        # MFU = the model's FLOPs per step (counted per layer) per second over the given
        # peak (1 TFLOP/s); XLA's figures are kept beside them, named by source.
        jax_r = quick["results"]["jaxsft"]
        counts = jax_r["flop_counts_per_device_step"]
        assert jax_r["mfu_flops_source"] == "model-count"
        assert counts["model-count"] == s["batch_size"] * flops.count(
            s["model"], s["image_size"], num_classes=s["num_classes"])["train_step"]
        assert counts["xla-cost-analysis"] == jax_r["flops_per_device_step"]
        assert 0.5 < counts["xla-cost-analysis-lowered"] / counts["model-count"] < 1.1
        assert r["mfu"] == pytest.approx(counts["model-count"] / (ms["median"] / 1e3) / 1e12)
    jax_rounds = quick["results"]["jaxsft"]["ms_per_step_per_round"]
    for name, ratio in quick["ratios"].items():
        other = quick["results"][name]["ms_per_step_per_round"]
        expected = [o / j for o, j in zip(other, jax_rounds)]
        assert ratio["per_round"] == pytest.approx(expected)
        assert ratio["median"] == pytest.approx(statistics.median(expected))
        assert ratio["min"] <= ratio["median"] <= ratio["max"]


def test_flop_count_matches_torchs_count_of_the_same_step(quick):
    """XLA's count of the compiled step against torch's FlopCounterMode on the seed's step.

    XLA does not count multiply-adds that fall on convolution padding, which at 64x64
    (2x2 maps in layer4) is a fifth of torch's dense count; a count of the forward pass only,
    or of several devices, would be off by a factor of 2 or more.
    """
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    s = quick["settings"]
    model = torchvision.models.resnet18(num_classes=s["num_classes"])
    x = torch.randn(s["batch_size"], 3, s["image_size"], s["image_size"])
    y = torch.randint(0, s["num_classes"], (s["batch_size"],))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    ratio = quick["results"]["jaxsft"]["flops_per_device_step"] / counter.get_total_flops()
    assert 0.6 < ratio < 1.2


def test_torch_compile_variants_wiring():
    """The torch.compile variant runs the seed's step through torch.compile and reports its
    compile time. TorchInductor takes ~2 minutes for resnet18 on this shared CPU, so the
    test compiles with the "aot_eager" backend: the same Dynamo capture and AOTAutograd
    forward/backward split, no code generation."""
    pytest.importorskip("torchvision")
    assert torch_loop.variant("torch-compile") == torch_loop.Variant(
        "torch-compile", channels_last=False, amp_bf16=False, compiled=True)
    assert torch_loop.variant("torch-compile-amp-cl") == torch_loop.Variant(
        "torch-compile-amp-cl", channels_last=True, amp_bf16=True, compiled=True)
    kw = dict(model="resnet18", num_classes=10, image_size=32, batch_size=2, bn_mode="train",
              lr=0.01, momentum=0.9, device="cpu", seed=0)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        torch_loop.TorchLoop("torch-compile-amp-cl", **kw)
    eager = torch_loop.TorchLoop("torch", **kw)
    compiled = torch_loop.TorchLoop("torch-compile", compile_backend="aot_eager", **kw)
    eager.step()  # the compiled loop took its first step while compiling
    for _ in range(2):
        eager.step()
        compiled.step()
    assert compiled.loss() == pytest.approx(eager.loss(), rel=1e-4)
    info = compiled.describe()
    assert info["compile_s"] > 0 and "aot_eager" in info["torch_compile"]
    assert "compile_s" not in eager.describe()


def test_scaling_over_devices_fed_by_the_input_pipeline(tmp_path):
    """Scaling over 1 and 2 (forced CPU) devices, with --pipeline: batches from jaxsft.data
    (the offline digits set, prepared in tmp_path) laid out for each device count."""
    s, _ = throughput.parse_args(["--quick", "--pipeline", "--data-dir", str(tmp_path),
                                  "--no-torch", "--no-cache", "--image-size", "32",
                                  "--batch-size", "2", "--steps", "2", "--rounds", "1",
                                  "--warmup", "0"])
    result = scaling.run(s, [1, 2], say=lambda *_: None)
    assert result["settings"]["data"] == "pipeline"
    runs = {r["devices"]: r for r in result["runs"]}
    assert sorted(runs) == [1, 2]
    assert all(r["ms_per_step"]["n"] == 2 and r["last_loss"] == r["last_loss"]
               for r in runs.values())
    assert runs[2]["efficiency"] == pytest.approx(
        runs[2]["images_per_s"] / (2 * runs[1]["images_per_s"]))
    assert runs[1]["efficiency"] == pytest.approx(1.0)
    # FLOPs are per device: the same per-device batch costs the same on 1 and 2 devices.
    assert runs[2]["flops_per_device_step"] == pytest.approx(
        runs[1]["flops_per_device_step"], rel=0.05)
    assert any("functional check" in n for n in result["notes"])


def test_conv_micro_times_every_formulation_and_the_one_the_model_picks():
    # resnet18 at 32x32 has most rules of choose_algorithms (not grouped convolutions, nor
    # XLA's strided input gradient, which needs > 16 output positions): oneDNN and the stored
    # kernel gradient on the stem and the 8x8 maps, matrix products for 1x1 kernels and small
    # maps.
    cmd = [sys.executable, "-m", "benchmarks.conv_micro", "--model", "resnet18", "--size",
           "32", "--batch", "2", "--rounds", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("x")]
    kernel_rows = [r for r in rows if " kernel_grad " in r]
    assert len(kernel_rows) == 11 and all("xla-stored" in r for r in kernel_rows)
    assert "pick xla-stored" in kernel_rows[0]  # the stem
    assert {r.rsplit("pick ", 1)[1] for r in rows} == {"onednn", "gemm", "xla-stored"}
    picked_onednn = [r.split(" g1 ")[1].split()[0] for r in rows if r.endswith("pick onednn")]
    assert picked_onednn == ["forward", "forward", "input_grad"]  # stem; 8x8 maps
    forwards = [r for r in rows if " forward " in r]
    assert forwards and all(" onednn " in r for r in forwards)  # a candidate everywhere
    totals = proc.stdout.split("totals over the model")[1]
    for which in ("forward", "input_grad", "kernel_grad"):
        assert f"  {which} " in totals
    assert "xla-stored" in totals.split("kernel_grad")[1]


def test_scaling_default_counts():
    assert scaling.default_counts(1) == [1]
    assert scaling.default_counts(4) == [1, 2, 4]
    assert scaling.default_counts(6) == [1, 2, 4, 6]


def test_too_many_devices_names_the_fix():
    with pytest.raises(throughput.BenchmarkError, match="xla_force_host_platform_device_count"):
        throughput.pick_devices(64)


def test_peaks_table():
    assert peaks.peak_tflops("NVIDIA H200", "bf16") == pytest.approx(989.4)
    assert peaks.peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)
    assert peaks.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(156.0)
    assert peaks.peak_tflops("TPU v5 lite", "bf16") == pytest.approx(197.0)
    assert peaks.peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 units
    assert peaks.peak_tflops("cpu", "fp32") is None


def test_compilation_cache_stores_and_reuses_executables(tmp_path):
    """Two fresh processes compile the same function: the first writes, the second hits."""
    script = (
        "import sys, jax, jax.numpy as jnp\n"
        "from jaxsft import compilation_cache as cache\n"
        "d = cache.enable_compilation_cache(sys.argv[1])\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "before = cache.cache_entries(d)\n"
        "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64))).block_until_ready()\n"
        "print(before, cache.cache_entries(d))\n"
    )
    counts = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, proc.stderr
        counts.append(tuple(int(v) for v in proc.stdout.split()))
    (b1, a1), (b2, a2) = counts
    assert b1 == 0 and a1 > 0  # the first process wrote its executable
    assert b2 == a1 and a2 == b2  # the second found it and wrote nothing new


def test_steps_xla_cannot_store_compile_without_a_warning_and_other_failures_still_warn(
        tmp_path):
    # XLA:CPU fails to serialize executables that call oneDNN (jaxsft.cpu.onednn) with
    # std::bad_alloc; JAX turns that into a warning on every run. jaxsft.cpu.configure()
    # silences only that one, however the cache was turned on (here by JAX's own setting).
    script = (
        "import sys, warnings, jax, jax.numpy as jnp\n"
        "import jaxsft.cpu\n"
        "from jaxsft.cpu.conv import conv2d\n"
        "jaxsft.cpu.configure()\n"
        "jax.config.update('jax_compilation_cache_dir', sys.argv[1])  # JAX's own switch\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "f = jax.jit(lambda x, k: conv2d(x, k, 1, 1))\n"
        "x, k = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))\n"
        "assert '__onednn$convolution' in f.lower(x, k).compile().as_text()\n"
        "print(float(f(x, k).sum()))\n"
        "warnings.warn(\"Error writing persistent compilation cache entry for 'g': \"\n"
        "              'OSError: [Errno 28] No space left on device')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == 2 * 4 * 4 * 22 * 22  # ones: 22 taps in each direction
    assert "bad_alloc" not in proc.stderr
    assert "No space left on device" in proc.stderr


def test_default_cache_dir_is_in_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / ".cache" / "jaxsft" / "jax-cache"
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "mine"))
    assert cache.default_cache_dir() == tmp_path / "mine" / "jax-cache"



def test_gpu_session_compile_options_exist_and_unknown_ones_are_dropped():
    """Every XLA option the GPU session passes is a real DebugOptions field of this jaxlib
    (XLA:CPU accepts the GPU ones and ignores them; a misspelt name is an error), so the
    GPU's minutes are not lost to a typo; one the GPU's XLA no longer knows is dropped."""
    import jax
    import jax.numpy as jnp

    from benchmarks import gpu_session

    lowered = jax.jit(lambda x: jnp.sin(x) @ x).lower(jnp.ones((4, 4)))
    options = {**gpu_session.COMPILE_LEVERS, **gpu_session.CONCURRENT,
               "xla_gpu_dump_autotune_results_to": "unused.txt"}
    _, applied = gpu_session.compile_with(lowered, options)
    assert applied == options
    _, applied = gpu_session.compile_with(lowered, {"xla_gpu_autotune_levle": 2, **options})
    assert applied == options


def test_gpu_session_hlo_audit():
    from benchmarks import gpu_session

    text = ("  %a = f32[8,56,56,64]{3,2,1,0} fusion(%x), kind=kLoop\n"
            "  %b = bf16[8,56,56,64]{3,2,1,0} custom-call(%a), "
            "custom_call_target=\"__cudnn$conv\"\n"
            "  %c = f32[64]{0} all-reduce(%b)\n")
    audit = gpu_session.hlo_audit(text, 8)
    assert audit["fusions"] == 1 and audit["custom_calls"] == 1
    assert audit["cudnn_convolutions"] == 1 and audit["all_reduces"] == 1
    assert audit["f32_activation_buffers_b8"] == 1 and audit["bf16_activation_buffers_b8"] == 1


@pytest.mark.slow
def test_gpu_run_script_smoke(tmp_path):
    """benchmarks/gpu_run.sh end to end on the CPU with JAXSFT_GPU_TINY=1 (resnet18, 32x32,
    batch 4): every stage of the GPU session runs and writes its JSON, no TensorFlow. About
    2 minutes on an idle 2-core CPU (4 under load): slow-marked."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAXSFT_GPU_TINY="1", OUT=str(tmp_path),
               PYTHON=sys.executable)  # the suite's interpreter, activated or not
    proc = subprocess.run(["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["errors"] == {} and summary["skipped"] == {}
    assert summary["imported_tensorflow"] is False
    stages = ("v1-cold", "v2-defaults", "v3-pad4", "v4-nocoll", "v5-concurrent",
              "input-cache", "v6-batch512", "v7-unrolled", "v7-scan")
    assert set(stages) <= set(summary["images_per_s"])
    assert summary["cold_start_compile_s"] > 0 and summary["warm_cache_compile_s"] >= 0
    baseline = json.loads((tmp_path / "baseline.json").read_text())
    assert set(baseline["runners"]) == {"jaxsft", "jaxsft-v1", "torch-cl", "torch-compile"}
    assert baseline["runners"]["torch-compile"]["compile_s"] > 0
    v1 = json.loads((tmp_path / "v1-cold.json").read_text())
    assert v1["flops_per_step"]["model-count"] == 4 * flops.count(
        "resnet18", 32, num_classes=10)["train_step"]
    assert v1["mfu_flops_source"] == "model-count" and v1["mfu"] > 0
    assert (tmp_path / "best-hlo.txt").stat().st_size > 0
    assert summary["hlo_audit"]["lines"] > 0 and baseline["torch_failed"] == {}
