#!/usr/bin/env bash
# Everything a lent GPU is needed for, in one call (device time is scarce: see RESULTS.md).
#
#   bash benchmarks/gpu_session.sh wheels   # here, once: pure-Python wheels missing on the GPU image
#   bash benchmarks/gpu_session.sh test     # there (carry .whl): the float64-checked tests on GPU
#   bash benchmarks/gpu_session.sh bench    # there (carry .whl): python -m benchmarks --full
#
# `test` and `bench` each fit in one device call (10 minutes); both install the carried wheels
# and write their logs and JSON to $OUT (what comes back from the device). The GPU image has jax,
# flax, optax, diffrax, chex, orbax, torch and torchdiffeq; ott-jax, jaxopt and flow_matching
# travel as wheels.
set -o pipefail
cd "$(dirname "$0")/.."
WHEELS="flow_matching==1.0.10 ott-jax==0.6.0 jaxopt==0.8.5"

case "${1:-run}" in
wheels)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform any -d .whl $WHEELS
    ;;
test | bench)
    OUT=${OUT:-/tmp/fmjax-gpu}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    python3 -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__)" \
        | tee "$OUT/versions.log"
    if [ "$1" = test ]; then
        timeout 540 python3 -m pytest -q -x -p no:cacheprovider tests/test_exact.py \
            tests/test_contracts.py tests/test_likelihood.py tests/test_sample.py 2>&1 \
            | tee "$OUT/gpu_tests.log"
    else
        timeout 560 python3 -m benchmarks --full 2>&1 | tee "$OUT/benchmarks.log"
        cp benchmarks/results/*.json "$OUT/" 2>/dev/null
    fi
    ;;
*)
    echo "usage: $0 wheels|test|bench" >&2
    exit 2
    ;;
esac
