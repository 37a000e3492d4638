#!/usr/bin/env bash
# The GPU checks of the Triton and CUDA backends, prepared for a session with a lent GPU
# (the developers' guide, "GPU"): each phase is meant to fit one device call (10 minutes).
#
#   bash bench/gpu_check.sh versions      # GPU, driver, torch, CUDA, Triton; missing modules
#   bash bench/gpu_check.sh build         # the C++ and CUDA extensions (nvcc: minutes), cached
#   bash bench/gpu_check.sh tests         # the whole suite on the GPU, backend "auto"
#   bash bench/gpu_check.sh forced        # the engine tests, backend triton then cuda forced
#   bash bench/gpu_check.sh bench         # python -m bench on cuda: f with divergence, all cases
#
# Everything lands under $OUT (the device tool's folder that comes back), else
# /tmp/gpu_check: versions.txt, one pytest log per run, bench/ with results.json/.md.
# It installs nothing (the device machine reaches no network): run it where torch,
# triton, torchdiffeq, pytest, hypothesis, tqdm and matplotlib import; "versions" lists
# what does not. Run "build" first on a fresh machine: the extensions are cached under
# ~/.cache/sparsekern there for the later phases. The last lines printed are a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary=()

need_gpu() {
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU here; these checks need one" >&2
    exit 2
  fi
}

versions() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    python - <<'PY'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "torchdiffeq", "pytest", "hypothesis", "tqdm", "matplotlib", "ninja"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except ImportError as exc:
        print(name, "MISSING", exc)
PY
  } 2>&1 | tee "$out/versions.txt"
}

# run_pytest NAME TIMEOUT_S [ENV=VALUE ...] -- PYTEST_ARGS...
run_pytest() {
  local name=$1 limit=$2
  shift 2
  local envs=()
  while [[ $# -gt 0 && $1 != "--" ]]; do envs+=("$1"); shift; done
  shift
  local start=$SECONDS
  env "${envs[@]}" timeout "$limit" python -m pytest -q -p no:cacheprovider -rfE "$@" \
    > "$out/pytest-$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" \
    "$(tail -n 1 "$out/pytest-$name.log")")")
}

case "${1:-}" in
  versions)
    versions
    ;;
  build)
    need_gpu
    start=$SECONDS
    timeout 560 python -c "
from sparsekern.backends import cpu, cuda
cpu.extension()
cuda.extension()
print('built the cpu and cuda extensions')" > "$out/build.log" 2>&1
    rc=$?
    summary+=("$(printf '%-22s rc=%-3s %4ss  %s' build "$rc" "$((SECONDS - start))" \
      "$(tail -n 1 "$out/build.log")")")
    ;;
  tests)
    need_gpu
    versions > /dev/null
    run_pytest auto 540 SPARSEKERN_TEST_DEVICE=cuda -- tests
    ;;
  forced)
    need_gpu
    versions > /dev/null
    engine=(tests/test_engine_ops.py tests/test_engine_compile.py tests/test_engine_solve.py
            tests/test_cuda_build.py tests/test_backend_select.py)
    run_pytest triton 270 SPARSEKERN_TEST_DEVICE=cuda SPARSEKERN_BACKEND=triton -- "${engine[@]}"
    run_pytest cuda 270 SPARSEKERN_TEST_DEVICE=cuda SPARSEKERN_BACKEND=cuda -- "${engine[@]}"
    ;;
  bench)
    need_gpu
    versions > /dev/null
    start=$SECONDS
    timeout 560 python -m bench --device cuda --metrics f_div --budget 0.25 --threads 16 \
      --out "$out/bench" --no-progress > "$out/bench.log" 2>&1
    rc=$?
    summary+=("$(printf '%-22s rc=%-3s %4ss' bench "$rc" "$((SECONDS - start))")")
    [[ -f $out/bench/results.md ]] && head -n 40 "$out/bench/results.md"
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac

for line in "${summary[@]}"; do echo "$line"; done
