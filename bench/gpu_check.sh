#!/usr/bin/env bash
# The GPU checks of the Triton and CUDA backends, prepared for a session with a lent GPU
# (the developers' guide, "GPU"): each phase is meant to fit one device call (10 minutes).
#
#   bash bench/gpu_check.sh versions      # GPU, driver, torch, CUDA, Triton; missing modules
#   bash bench/gpu_check.sh build         # the C++ and CUDA extensions (nvcc: minutes), cached
#   bash bench/gpu_check.sh tests         # the whole suite on the GPU, backend "auto"
#   bash bench/gpu_check.sh forced        # the engine tests, backend triton then cuda forced
#   bash bench/gpu_check.sh bench         # python -m bench on cuda: f with divergence, all cases
#   bash bench/gpu_check.sh smoke         # all of it in small, under 6 minutes on a fresh machine
#   SMOKE_DEVICE=cpu bash bench/gpu_check.sh smoke   # the same steps as a dry run on a CPU
#
# Everything lands under $OUT (the device tool's folder that comes back), else
# /tmp/gpu_check: versions.txt, one pytest log per run, bench/ with results.json/.md.
# It installs nothing (the device machine reaches no network): run it where torch,
# triton, torchdiffeq, pytest, hypothesis, tqdm and matplotlib import; "versions" lists
# what does not. Run "build" first on a fresh machine: the extensions are cached under
# ~/.cache/sparsekern there for the later phases. "smoke" needs no earlier phase: it builds
# the CUDA extension in the background within a budget, every step has a hard time limit,
# and it ends with a table (bench/README.md, "gpu_check.sh smoke"; files under
# $OUT/smoke). The last lines printed are a summary.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
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

# ----------------------------------------------------------------------------- smoke
# Each step runs under `timeout` with limit min(cap, time left to the phase's deadline minus
# what later steps reserve); a step with under 10 s left is skipped. Steps append a line
# (name, rc or "skip", seconds, limit, note) to $sdir/steps.tsv; bench/gpu_smoke.py summary
# turns it, the logs and the JSON files into smoke.json / smoke.md and prints the table.
SMOKE_SEL="TestOnGpu or width_1025 or second_order or opcheck or refuses or activations_are_accurate"
SMOKE_SEL+=" or (fused_program_backends and (mixed or (dense and (sigmoid or tanh))))"
# The CPU dry run's stand-in for the Triton op tests on CUDA: the kernels against their
# references under Triton's interpreter (tests/test_triton_kernels.py's *Interpreted classes).
SMOKE_INTERP_SEL="Interpreted and (test_batch_widths or test_toy_model_every_activation"
SMOKE_INTERP_SEL+=" or test_sparse_and_dense_layers or TestRegistryInterpreted)"
# The CPU dry run's stand-in for the CUDA backend's op tests: a few with the cpu backend (its
# kernels run the whole selection's float math on 2 cores, not in a minute).
SMOKE_CPU_SEL="width_1025 or second_order or opcheck or refuses"
SMOKE_CASES=${SMOKE_CASES:-"toy/unstructured/1 toy/unstructured/0.3 miniboone/unstructured/0.1
  miniboone/unstructured/0.02 miniboone/structured/0.3"}

smoke_left() {  # CAP RESERVE -> seconds this step may take
  local left=$((smoke_deadline - SECONDS - $2))
  echo $(( left < $1 ? left : $1 ))
}

smoke_record() {  # NAME RC SECONDS LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$sdir/steps.tsv"
  printf 'smoke: %-14s rc=%-4s %4ss (limit %ss) %s\n' "$1" "$2" "$3" "$4" "${5:-}" >&2
}

# smoke_step NAME CAP RESERVE NOTE [ENV=VALUE ...] -- COMMAND...  (output: $sdir/NAME.log)
smoke_step() {
  local name=$1 cap=$2 reserve=$3 note=$4
  shift 4
  local envs=()
  while [[ $# -gt 0 && $1 != "--" ]]; do envs+=("$1"); shift; done
  shift
  if [[ -n ${smoke_stop:-} ]]; then
    smoke_record "$name" skip 0 0 "$smoke_stop"
    return 1
  fi
  local limit
  limit=$(smoke_left "$cap" "$reserve")
  if (( limit < 10 )); then
    smoke_record "$name" skip 0 "$limit" "no time left before the phase's deadline"
    return 1
  fi
  local start=$SECONDS
  env "${envs[@]}" timeout -k 5 "$limit" "$@" > "$sdir/$name.log" 2>&1
  local rc=$?
  (( rc == 124 || rc == 137 )) && note="killed at its time limit${note:+; $note}"
  smoke_record "$name" "$rc" "$((SECONDS - start))" "$limit" "$note"
  return "$rc"
}

smoke() {
  local mode=${SMOKE_DEVICE:-cuda}
  sdir="$out/smoke"
  rm -rf "$sdir"
  mkdir -p "$sdir"
  date +%s > "$sdir/started"
  smoke_deadline=$((SECONDS + ${SMOKE_BUDGET_S:-320}))  # the summary's 20 s come after it
  smoke_stop=""
  local dev fast build_bk interp=() threads pytest=(python -m pytest -p no:cacheprovider -v
    -rfE --durations=15)
  if [[ $mode == cpu ]]; then
    dev=cpu build_bk=cpu threads=2 interp=(TRITON_INTERPRET=1)
  else
    dev=cuda build_bk=cuda threads=16
  fi
  fast=triton

  # (a) versions: device, driver, torch, CUDA, Triton, missing modules.
  smoke_step versions 30 0 "" "${interp[@]}" -- \
    python -m bench.gpu_smoke versions --device "$dev" --out "$sdir/versions.json"
  cat "$sdir/versions.log"
  if [[ $mode != cpu ]] && ! grep -q '^cuda_available: True' "$sdir/versions.log"; then
    smoke_stop="torch sees no CUDA GPU (SMOKE_DEVICE=cpu runs the CPU dry run)"
  fi

  # (c, started now) the compiled backend's extension, built in the background within a
  # budget (nvcc: minutes) while (b) and (d) run; its op tests and solve run only if built.
  local build_pid="" build_cap
  build_cap=$(( ${SMOKE_BUILD_S:-200} - SECONDS + smoke_deadline - ${SMOKE_BUDGET_S:-320} ))
  if [[ -z $smoke_stop ]] && (( build_cap >= 10 )); then
    (
      start=$SECONDS
      timeout -k 5 "$build_cap" python -c "
from sparsekern.backends import $build_bk
print('built', $build_bk.extension().__file__)" > "$sdir/$build_bk-build.log" 2>&1
      echo "$? $((SECONDS - start)) $build_cap" > "$sdir/.build_status"
    ) &
    build_pid=$!
  fi

  # (b) the op tests against their references, backend triton on the device.
  if [[ $mode == cpu ]]; then
    smoke_step pytest-$fast 120 150 "interpreted kernels (CPU dry run)" TRITON_INTERPRET=1 \
      -- "${pytest[@]}" tests/test_triton_kernels.py -k "$SMOKE_INTERP_SEL"
  else
    smoke_step pytest-$fast 120 150 "" SPARSEKERN_TEST_DEVICE=cuda SPARSEKERN_BACKEND=$fast \
      -- "${pytest[@]}" tests/test_cuda_build.py tests/test_engine_ops.py \
      -k "$fast and not auto_backend and ($SMOKE_SEL)"
  fi

  # (d) one compiled CNF dopri5 solve against the dense masked model, float32 and float64.
  local batch=1024
  [[ $mode == cpu ]] && batch=64  # the interpreter runs a 1024 batch at seconds per NFE
  smoke_step solve-$fast 45 90 "" "${interp[@]}" SPARSEKERN_BACKEND=$fast -- \
    python -m bench.gpu_smoke solve --device "$dev" --backends $fast --batch $batch \
    --out "$sdir/solve-$fast.json"

  # (d2) the native solver on the device: its device loop (step control on the GPU, no
  # host sync per step) and the CUDA-graph replay of its steps, against the host loop.
  if [[ $mode != cpu ]]; then
    smoke_step pytest-solver 40 70 "" -- "${pytest[@]}" tests/test_solver.py \
      -k "cuda_solve or cuda_flow"
    # (d3) compiled convolutions (image flows) on the device, Triton's kernels.
    smoke_step pytest-conv 40 70 "" SPARSEKERN_TEST_DEVICE=cuda SPARSEKERN_BACKEND=$fast \
      -- "${pytest[@]}" tests/test_conv_engine.py -k "matches_dense or small_batches"
  fi

  # (c) the compiled backend, if it was built in time.
  local built=0
  if [[ -n $build_pid ]]; then
    wait "$build_pid"
    local brc bsecs blimit
    read -r brc bsecs blimit < "$sdir/.build_status"
    local bnote
    bnote="in the background; $(tail -n 1 "$sdir/$build_bk-build.log" | cut -c1-160)"
    (( brc == 124 || brc == 137 )) && bnote="not built within its budget: backend $build_bk skipped"
    smoke_record "$build_bk-build" "$brc" "$bsecs" "$blimit" "$bnote"
    (( brc == 0 )) && built=1
  else
    smoke_record "$build_bk-build" skip 0 0 "${smoke_stop:-no time left}"
  fi
  if (( built )); then
    if [[ $mode == cpu ]]; then
      smoke_step pytest-$build_bk 60 90 "" SPARSEKERN_TEST_DEVICE=cpu -- \
        "${pytest[@]}" tests/test_engine_ops.py -k "$build_bk and ($SMOKE_CPU_SEL)"
    else
      smoke_step pytest-$build_bk 60 90 "" SPARSEKERN_TEST_DEVICE=cuda -- \
        "${pytest[@]}" tests/test_cuda_build.py tests/test_engine_ops.py \
        -k "$build_bk and not triton and not reduced_precision and ($SMOKE_SEL)"
    fi
    smoke_step solve-$build_bk 30 90 "" -- python -m bench.gpu_smoke solve --device "$dev" \
      --backends $build_bk --batch $batch --out "$sdir/solve-$build_bk.json"
  else
    smoke_record pytest-$build_bk skip 0 0 "the $build_bk extension was not built"
  fi

  # (e) f with divergence on the toy and MINIBOONE cases.
  local providers=(dense_eager)
  if [[ $mode == cpu ]]; then
    (( built )) && providers+=(sparsekern_cpu)
  else
    providers+=(sparsekern_triton)
    (( built )) && providers+=(sparsekern_cuda)
  fi
  # shellcheck disable=SC2086  # SMOKE_CASES is a list of case names
  smoke_step bench 90 0 "providers ${providers[*]}" -- python -m bench.gpu_smoke bench -- \
    --device "$dev" --cases $SMOKE_CASES --metrics f_div --providers "${providers[@]}" \
    --budget 0.2 --warmup 2 --min-repeats 5 --max-repeats 20 --threads "$threads" \
    --out "$sdir/bench" --no-plots --no-progress

  # (f) the summary: smoke.json, smoke.md, and the table on stdout.
  timeout -k 5 20 python -m bench.gpu_smoke summary --dir "$sdir"
  local rc=$?
  [[ -n $smoke_stop ]] && rc=2
  return "$rc"
}

case "${1:-}" in
  smoke)
    smoke
    exit $?
    ;;
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
    sed -n '2,/^[^#]/p' "$0" | sed '$d'  # the header comment: usage
    exit 2
    ;;
esac

for line in "${summary[@]}"; do echo "$line"; done
