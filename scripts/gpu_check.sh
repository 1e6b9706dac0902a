#!/usr/bin/env bash
# One prepared run for a lent H100 / H200, sized for a lease of about 15 minutes of device time
# (machine start included): every step has a time limit and the whole script ends within 8 minutes.
#
#   bash scripts/gpu_check.sh          # from the repository root
#
#   1. tests    the kernel tests, compiled for this GPU (no interpreter: they pick CUDA when present)
#   2. bench    scripts/bench_quick.py: each case checked against a reference, then timed; decode
#               attention fp16/bf16 at 8k/32k x batch 1/8/32 vs SDPA and the copy bandwidth,
#               W4 / W8A8 / W4A8 vs cuBLAS fp16 at M = 1 and 16
#   e2e      KIVI-2 end to end on the first layers of a random Llama-2-7B-shaped model, batch 1 and 8:
#               ms per decode step against the uncompressed cache, checked against KIVI on torch
#   3. resources  scripts/kernel_resources.py with this machine's Triton (compile-only numbers,
#               to set beside the registers the driver reported in step 2)
#
# Needs torch, triton and pytest (pytest-xdist is used when present). qeval is read from this
# checkout through PYTHONPATH, so nothing is installed (a lent machine reaches no registry).
# Writes results/bench/<device>.json (rewritten after every benchmark case),
# <device>-resources.json and gpu_check-<step>.log beside it, and copies them to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
RES=results/bench
mkdir -p "$RES"

DEV=$($PY - <<'EOF'
import torch, triton
assert torch.cuda.is_available(), "gpu_check: no CUDA device"
name = torch.cuda.get_device_name()
print(name, "| torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda,
      file=__import__("sys").stderr)
print(name.replace(" ", "_").replace("/", "_"))
EOF
) || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv 2>/dev/null || true

status=0
step() {   # step NAME SECONDS COMMAND...: run with a limit, log to $RES/gpu_check-NAME.log
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$RES/gpu_check-$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || status=1
}

# compilation dominates the tests: spread it over workers when pytest-xdist is there; without it,
# the project's own addopts (which ask for xdist's workers) are replaced
XDIST=(-o addopts=-q)
$PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step tests 170 $PY -m pytest -q -rfE -p no:cacheprovider "${XDIST[@]}" \
    --junitxml="$RES/gpu_check-tests.xml" \
    tests/test_kernels_kv_decode.py tests/test_kernels_kv_pack.py tests/test_kernels_wq.py \
    tests/test_kernels_wa.py
step bench 170 $PY scripts/bench_quick.py --sections kv w --out "$RES"
step e2e 60 $PY scripts/bench_quick.py --sections e2e --out "$RES"
step resources 40 $PY scripts/kernel_resources.py --jobs 8 --json "$RES/$DEV-resources.json"

if [ -n "${OUT:-}" ]; then
    cp "$RES/$DEV.json" "$RES/$DEV-resources.json" "$RES"/gpu_check-*.log "$RES/gpu_check-tests.xml" \
        "$OUT"/ 2>/dev/null || true
fi
echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED steps above), $SECONDS s"
exit $status
