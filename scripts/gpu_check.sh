#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with an NVIDIA GPU (and no internet):
#   1. check the GPU and the Python packages (install hpsearch itself from this checkout, and
#      its dependencies only from a local wheel folder, never from the network);
#   2. pytest -m gpu;
#   3. the GPU part of the benchmark (trials_per_device 1, 2, 4 on one GPU);
#   4. print the results.
# Usage: bash scripts/gpu_check.sh [OUT]      (OUT defaults to $OUT, else results/gpu-check)
# Env:   PYTHON (default python), WHEELHOUSE (folder of wheels for missing dependencies).
# Exit status: 0 when every step passed; 2 when the machine cannot run the checks at all.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${1:-${OUT:-results/gpu-check}}"
PY="${PYTHON:-python}"
mkdir -p "$OUT_DIR"
status=0
step() { echo; echo "== $*"; }

step "GPU"
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
    echo "error: nvidia-smi failed: no NVIDIA GPU or driver on this machine" >&2
    exit 2
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: torch cannot use CUDA here ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1));" \
         "a CUDA build of torch is needed" >&2
    exit 2
fi

step "packages"
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "optuna", "joblib", "numpy", "yaml", "pydantic", "mnist1d", "sklearn",
        "plotly", "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    if [ -n "${WHEELHOUSE:-}" ] && [ -d "$WHEELHOUSE" ]; then
        echo "installing from $WHEELHOUSE: $missing"
        "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" -e ".[dev]" || {
            echo "error: offline install from $WHEELHOUSE failed" >&2; exit 2; }
    else
        echo "error: missing Python packages: $missing" >&2
        echo "       this machine has no internet: carry wheels in and set WHEELHOUSE=<folder>" >&2
        exit 2
    fi
fi
if ! "$PY" -c 'import hpsearch' 2>/dev/null; then
    # hpsearch itself needs nothing from the network: no dependency resolution, no build env.
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >/dev/null || {
        echo "error: cannot install hpsearch from this checkout" >&2; exit 2; }
fi
"$PY" -c 'import torch, optuna, hpsearch; print("torch", torch.__version__, "| optuna",
optuna.__version__, "| hpsearch", hpsearch.__version__, "|", torch.cuda.get_device_name(0))'

step "pytest -m gpu"
"$PY" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -n 30
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 5 ]; then
    echo "(no test is marked gpu)"
elif [ "$rc" -ne 0 ]; then
    echo "error: pytest -m gpu failed (exit $rc)" >&2
    status=1
fi

step "benchmark, GPU part"
if ! timeout 480 "$PY" scripts/bench.py --gpu-only --out "$OUT_DIR/bench"; then
    echo "error: the GPU benchmark failed or ran past 8 minutes" >&2
    status=1
fi

step "results"
if [ -f "$OUT_DIR/bench/bench.json" ]; then
    "$PY" - "$OUT_DIR/bench/bench.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
print(json.dumps({"machine": doc.get("machine"), "gpu": doc.get("gpu")}, indent=2))
EOF
fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
echo
echo "gpu_check: $([ "$status" -eq 0 ] && echo passed || echo FAILED); files in $OUT_DIR"
exit "$status"
