"""The XLA flag every test process compiles with: a module of its own, with no imports, so
that conftest can read it before anything starts JAX (helpers imports jaxsft, which must
wait for torchvision)."""

# XLA's backend (LLVM) at optimisation level 1: a test's time is mostly compiling, which this
# roughly halves (a 2-step ResNet-18 fit: 31 -> 19 s here), while the float64 parity tests'
# long runs stay as fast as at the default level 2 (level 0 made them 3.5x slower). What is
# computed is the same up to rounding, and speed is measured by benchmarks/, never by a test.
# conftest sets it for the test processes and their children; tests that build their own
# XLA_FLAGS add it (`helpers.FAST_COMPILE`).
FAST_COMPILE = "--xla_backend_optimization_level=1"
