#!/usr/bin/env bash
# One prepared GPU session of at most ~9 minutes on one H200: ResNet-50 at 224, bf16, batch
# 256, in ONE process (benchmarks/gpu_session.py): the cold compile with the compile-time
# levers, XLA's defaults, the baseline against the seed's loop in torch eager AMP
# channels_last and under torch.compile (alternating), the runtime levers in
# gpu-leads.md's order (pad to 4 channels, no collectives, CONCURRENT command buffers), the
# cached on-device input path against synthetic data, batch 512; MFU from the model's FLOP
# count. Every stage writes its JSON under $OUT as it ends; summary.json at the end.
#
#   bash benchmarks/gpu_run.sh                  # or: OUT=/some/dir bash benchmarks/gpu_run.sh
#   JAXSFT_GPU_TINY=1 bash benchmarks/gpu_run.sh   # CPU smoke test: resnet18, 32x32, batch 4
#
# Needs python3 with jax (CUDA), flax, optax, torch and torchvision; no TensorFlow, no
# install of jaxsft (the repository root goes on PYTHONPATH). GPU_SESSION_BUDGET_S (default
# 520) is when the session stops starting stages; the whole run is killed at 570 s.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$dest"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
tiny=${JAXSFT_GPU_TINY:-0}
log="$dest/gpu_run.log"
: >"$log"

say() { echo "== $*" | tee -a "$log"; }

say "$(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git) tiny=$tiny"
if [ "$tiny" != 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv 2>&1 | tee -a "$log"
    if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
        say "JAX sees no GPU: stopping"
        exit 1
    fi
fi
budget=${GPU_SESSION_BUDGET_S:-520}
args=(--out "$dest" --budget-s "$budget")
[ "$tiny" = 1 ] && args+=(--tiny --peak-tflops 1)
say "gpu_session ${args[*]}"
timeout $((budget + 50)) $PY -m benchmarks.gpu_session "${args[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || say "gpu_session failed (exit $rc); the stages that ended are in $dest"
$PY - "$dest" <<'EOF' 2>&1 | tee -a "$log"
import json, sys
from pathlib import Path
dest = Path(sys.argv[1])
for f in sorted(dest.glob("*.json")):
    r = json.loads(f.read_text())
    keep = {k: r[k] for k in ("compile_s", "images_per_s", "mfu", "error") if k in r}
    print(f"{f.stem:16s} {keep}")
EOF
say "done in ${SECONDS}s; results in $dest"
exit "$rc"
