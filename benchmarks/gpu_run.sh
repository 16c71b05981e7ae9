#!/usr/bin/env bash
# One prepared GPU benchmark session: ResNet-50 at 224x224, batch 128 per GPU, jaxsft's train
# step against the seed's PyTorch loop (fp32 NCHW, and AMP bf16 + channels_last) in the same
# process, in alternating rounds. Run from anywhere; results go to $OUT if set (the lent
# device machine), else to benchmarks/results/. About 6-8 minutes on one H200, most of it
# compilation (the persistent cache makes a rerun on the same machine faster).
#
#   bash benchmarks/gpu_run.sh              # or: OUT=/some/dir bash benchmarks/gpu_run.sh
#
# Needs python3 with jax (CUDA), flax, optax, torch and torchvision; no TensorFlow, no
# install of jaxsft (the repository root goes on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$dest/gpu_run.log"
: >"$log"

say() { echo "== $*" | tee -a "$log"; }

say "$(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
    --format=csv 2>&1 | tee -a "$log"
$PY - <<'EOF' 2>&1 | tee -a "$log"
import jax, torch, torchvision, flax, optax
print("jax", jax.__version__, jax.devices())
print("flax", flax.__version__, "optax", optax.__version__)
print("torch", torch.__version__, "torchvision", torchvision.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())
EOF
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
    say "JAX sees no GPU: stopping"
    exit 1
fi
gpu=$($PY -c "import jax; print(jax.devices()[0].device_kind.lower().replace('nvidia ', '').replace(' ', '-'))")
ngpu=$($PY -c "import jax; print(jax.local_device_count())")

# name, timeout (s), then benchmarks.throughput flags. Headline first: pipelined steps
# (synchronised once per block of 20), bf16; then fp32 with every step synchronised.
common=(--model resnet50 --image-size 224 --batch-size 128 --devices 1 --warmup 5)
bench() {
    local name=$1 limit=$2
    shift 2
    say "throughput $name: $*"
    timeout "$limit" $PY -m benchmarks.throughput "${common[@]}" "$@" \
        --json "$dest/gpu-$gpu-$name.json" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || say "throughput $name failed (exit $rc)"
}
bench resnet50-bf16 300 --dtype bf16 --sync block --steps 100 --rounds 5 \
    --torch-variants torch-amp-cl,torch
bench resnet50-fp32 300 --dtype fp32 --sync step --steps 60 --rounds 3 \
    --torch-variants torch,torch-amp-cl
if [ "$SECONDS" -lt 420 ]; then  # per-step spread in bf16 if time is left
    bench resnet50-bf16-stepsync 150 --dtype bf16 --sync step --steps 60 --rounds 3 \
        --torch-variants torch-amp-cl
fi
if [ "$ngpu" -gt 1 ]; then
    say "scaling over $ngpu GPUs"
    timeout 300 $PY -m benchmarks.scaling --model resnet50 --image-size 224 \
        --batch-size 128 --dtype bf16 --sync block --steps 60 --rounds 3 \
        --json "$dest/gpu-$gpu-scaling.json" 2>&1 | tee -a "$log"
fi
say "done in ${SECONDS}s; results in $dest"
