"""The XLA:CPU flag jaxsft sets at import: when it is added, and that it still works."""

import os
import subprocess
import sys

import pytest

from jaxsft import xla_cpu


def test_the_flag_is_appended_to_the_users_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_cpu.apply(env, jaxlib="0.10.2")
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {xla_cpu.FLAG}"
    assert xla_cpu.apply(env, jaxlib="0.10.2")  # idempotent
    assert env["XLA_FLAGS"].count(xla_cpu.FLAG_NAME) == 1
    empty = {}
    assert xla_cpu.apply(empty, jaxlib="0.10.2") and empty["XLA_FLAGS"] == xla_cpu.FLAG


def test_a_users_own_value_wins_and_untested_jaxlibs_are_left_alone():
    mine = {"XLA_FLAGS": f"--{xla_cpu.FLAG_NAME}=+individual_convolution"}
    assert not xla_cpu.apply(mine, jaxlib="0.10.2")
    assert mine["XLA_FLAGS"] == f"--{xla_cpu.FLAG_NAME}=+individual_convolution"
    future = {}
    assert not xla_cpu.apply(future, jaxlib="0.11.0")  # XLA would abort on an unknown flag
    assert future == {}


CONV_HLO = """
import jax, jax.numpy as jnp
import jaxsft
cpu = jax.devices("cpu")[0]
x = jax.device_put(jnp.ones((4, 16, 16, 64)), cpu)  # large enough for YNNPACK
k = jax.device_put(jnp.ones((3, 3, 64, 64)), cpu)
conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print(conv.lower(x, k).compile().as_text())
"""


@pytest.mark.parametrize("user_flags, convolutions_in_ynnpack", [
    ("", False),  # jaxsft's flag: Eigen's multi-threaded convolution
    (f"--{xla_cpu.FLAG_NAME}=individual_convolution", True),  # the user's own choice
])
def test_the_installed_jaxlib_honours_the_flag(user_flags, convolutions_in_ynnpack):
    # Fails when a jaxlib upgrade drops the flag (update TESTED_JAXLIB) or stops honouring it.
    env = {**os.environ, "XLA_FLAGS": user_flags}
    hlo = subprocess.run([sys.executable, "-c", CONV_HLO], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "convolution(" in hlo
    assert ("__ynn_fusion" in hlo) == convolutions_in_ynnpack, hlo
