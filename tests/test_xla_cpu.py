"""The XLA:CPU set-up `jaxsft.cpu.configure()` does: when the flags are added, that they still
work, and the one warning it silences."""

import os
import subprocess
import sys
import warnings

import pytest

import jaxsft.cpu
from jaxsft.cpu import xla_flags

OURS = " ".join(f"--{name}={value}" for name, value in xla_flags.FLAGS.items())


def test_the_flags_are_appended_to_the_users_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_flags.apply(env, jaxlib="0.10.2") == xla_flags.FLAGS
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {OURS}"
    assert xla_flags.apply(env, jaxlib="0.10.2") == xla_flags.FLAGS  # idempotent
    assert all(env["XLA_FLAGS"].count(name) == 1 for name in xla_flags.FLAGS)
    empty = {}
    assert xla_flags.apply(empty, jaxlib="0.10.2") == xla_flags.FLAGS and empty["XLA_FLAGS"] == OURS


def test_a_users_own_values_win_and_untested_jaxlibs_are_left_alone():
    ynn, emitters = xla_flags.FLAGS
    mine = {"XLA_FLAGS": f"--{ynn}=+individual_convolution"}
    assert xla_flags.apply(mine, jaxlib="0.10.2") == {emitters: "false"}
    assert mine["XLA_FLAGS"] == f"--{ynn}=+individual_convolution --{emitters}=false"
    bare = {"XLA_FLAGS": f"--{emitters}"}  # a boolean flag without a value means true
    assert xla_flags.apply(bare, jaxlib="0.10.2") == {ynn: xla_flags.FLAGS[ynn]}
    assert bare["XLA_FLAGS"] == f"--{emitters} --{ynn}={xla_flags.FLAGS[ynn]}"
    future = {}
    assert xla_flags.apply(future, jaxlib="0.11.0") == {}  # XLA would abort on an unknown flag
    assert future == {}


def test_configure_sets_the_flags_and_silences_only_onednns_cache_warning():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert jaxsft.cpu.configure(env) == xla_flags.FLAGS  # the installed jaxlib is tested
        assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {OURS}"
        prefix = "Error writing persistent compilation cache entry for 'jit_f': "
        for cause in ("MemoryError: std::bad_alloc",  # an executable calling oneDNN
                      "OSError: [Errno 28] No space left on device"):
            warnings.warn(prefix + cause, UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [prefix + "OSError: [Errno 28] No space left "
                                                "on device"]


CONV_HLO = """
import os
import jax, jax.numpy as jnp
import jaxsft.cpu
jaxsft.cpu.configure()  # before the backend starts
cpu = jax.devices("cpu")[0]
x = jax.device_put(jnp.ones((4, 16, 16, 64)), cpu)  # large enough for YNNPACK
k = jax.device_put(jnp.ones((3, 3, 64, 64)), cpu)
conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print(conv.lower(x, k).compile().as_text())
print("XLA_FLAGS:", os.environ["XLA_FLAGS"])
"""


@pytest.mark.parametrize("user_flags, convolutions_in_ynnpack", [
    ("", False),  # jaxsft's flag: Eigen's multi-threaded convolution
    ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution", True),  # the user's
])
def test_the_installed_jaxlib_knows_the_flags_and_honours_the_convolution_one(
        user_flags, convolutions_in_ynnpack):
    # Fails when a jaxlib upgrade drops a flag (XLA aborts on unknown flags: update
    # TESTED_JAXLIB) or stops honouring the convolution flag. The emitter flag changes the
    # generated code only, not the HLO; its effect is measured in benchmarks/cpu_notes.md.
    env = {**os.environ, "XLA_FLAGS": user_flags}
    out = subprocess.run([sys.executable, "-c", CONV_HLO], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "convolution(" in out
    assert ("__ynn_fusion" in out) == convolutions_in_ynnpack, out
    assert "--xla_cpu_use_fusion_emitters=false" in out.rsplit("XLA_FLAGS:", 1)[1]
