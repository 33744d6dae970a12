#!/usr/bin/env bash
# GPU check of the Triton backend in one run (docs/triton.md): the GPU tests, agreement at
# N=8192 D=2304 V=256000 bfloat16 with a dense float32 reference, and speed/memory against the peers.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # from the repository root, on a CUDA machine
#
# OUT_DIR defaults to $OUT, else results/gpu_check. Peers come from wheels in $WHEELS (default .whl/,
# installed with --no-deps into a temporary folder; see docs/triton.md for fetching them); a peer that
# is missing is skipped. At most 8 minutes: the tests within 200 s, the rest within 290 s.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-results/gpu_check}}
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

SITE=$(mktemp -d)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
        || echo "the peer wheels did not install; their rows will say so"
fi
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
    $PY -m pip list 2>/dev/null | grep -i -E "cut.cross|liger|^torch |^triton " || true
    ls "$SITE"
} > "$OUT_DIR/env.txt"

# 1. The GPU tests (compiled kernels on every streamable loss and option; no interpreter on CUDA).
#    Compilation dominates: with pytest-xdist, eight workers compile side by side.
PARALLEL=$($PY -c "import xdist" >/dev/null 2>&1 && echo "-n 8" || echo "")
timeout 200 $PY -m pytest -q -p no:cacheprovider $PARALLEL tests/test_triton.py tests/test_structure.py \
    > "$OUT_DIR/tests.log" 2>&1
echo "tests: exit $? ($(tail -n 1 "$OUT_DIR/tests.log"))"

# 2-5. Agreement at scale, speed and memory against the peers, other losses, tile shapes.
timeout 290 $PY benchmarks/gpu_check.py --out "$OUT_DIR" --budget 260 > "$OUT_DIR/check.log" 2>&1
echo "check: exit $?"
cat "$OUT_DIR/report.md" 2>/dev/null || tail -n 40 "$OUT_DIR/check.log"
