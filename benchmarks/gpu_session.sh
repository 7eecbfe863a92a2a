#!/usr/bin/env bash
# The one script a GPU session runs: environment, GPU tests, kernel tuning and throughput, the per-example loss
# kernel, capture overhead.
#
#   bash benchmarks/gpu_session.sh                  # on the GPU machine: repo root, $OUT set, .whl/ carried
#   bash benchmarks/gpu_session.sh --cpu-dry-run    # rehearsal on a CPU machine (small sizes, --device cpu);
#                                                   # $OUT defaults to a fresh temporary directory
#
# Every step has its own timeout, its output tee'd to a file in $OUT, and a failed step does not stop the
# next. What lands in $OUT (at most 8 files: the device tool brings back no more):
#   env.txt                     versions, nvidia-smi, import checks, and at the end each step's rc and seconds
#   pytest_gpu.log              GPU-marked tests: tests/kernels/test_gpu.py and tests/unlearn/test_capture_gpu.py
#   kernel_throughput.log       + kernel_throughput_<device>.json (rewritten after every row; no PNG:
#                               draw it from the JSON afterwards, with kernel_throughput.plot)
#   ascent_tuning_<device>.json the deterministic kernel's sweep (its log goes into kernel_throughput.log)
#   cross_entropy_<device>.json the per-example loss kernel (its log goes into kernel_throughput.log)
#   capture_overhead.log        + capture_overhead_<device>.json
#   (pytest_gpu.log also gets, if time is left, the Triton-vs-reference parity tests compiled on the GPU)
# Worst case (every step at its timeout) ~9 minutes (530 s); expected ~5. Environment knobs: BUDGET_S (default 330:
# the optional step only starts with >= 45 s of it left), PYTHON (default python3).
set -u -o pipefail

DRY=0
if [[ "${1:-}" == "--cpu-dry-run" || "${GPU_SESSION_DRY_RUN:-0}" == "1" ]]; then
  DRY=1
fi
if [[ -z "${OUT:-}" ]]; then
  if [[ $DRY == 1 ]]; then OUT=$(mktemp -d); else echo "OUT is not set" >&2; exit 2; fi
fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-330}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SUMMARY=""
ENV_TXT="$OUT/env.txt"
: > "$ENV_TXT"

# ---------------------------------------------------------------------------------------------- packages
# The image lacks zarr, numcodecs, google-crc32c, donfig, fastapi & co.: they travel as wheels in .whl/
# (fetched by ../shared/device/fetch-wheels.sh). The repo's packages are imported from the tree itself.
if [[ $DRY == 0 ]]; then
  {
    echo "== wheels: $(ls .whl/*.whl 2>/dev/null | wc -l) in .whl/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl 2>&1 || echo "!! wheel install failed (rc $?)"
  } | tee -a "$ENV_TXT"
  export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels:$PWD/server:$PWD/src
else
  # Rehearsal: this machine's environment has the packages; hide the editable install (the GPU machine has
  # none, so imports must work through PYTHONPATH alone) and modules the image lacks.
  SHIM=$(mktemp -d)
  cat > "$SHIM/sitecustomize.py" <<'PYEOF'
import importlib.abc
import os
import sys

def _module(finder):  # finders are instances or classes (setuptools' editable finder is a class)
    return (finder if isinstance(finder, type) else type(finder)).__module__


sys.meta_path[:] = [f for f in sys.meta_path if not _module(f).startswith("__editable__")]
BLOCKED = set(os.environ.get("GPU_SESSION_BLOCK", "s3fs").split(","))


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: absent on the GPU image)")
        return None


sys.meta_path.insert(0, _Block())
PYEOF
  export PYTHONPATH=$SHIM:$PWD:$PWD/kernels:$PWD/server:$PWD/src
  echo "== dry run on CPU: OUT=$OUT, blocked modules: ${GPU_SESSION_BLOCK:-s3fs}" | tee -a "$ENV_TXT"
fi

# ------------------------------------------------------------------------------------------------- steps
# run_step NAME LOGFILE TIMEOUT_S COMMAND...: run with a timeout, tee to LOGFILE, record rc and seconds.
run_step() {
  local name=$1 log=$2 limit=$3
  shift 3
  local t0=$SECONDS
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0))
  [[ $rc == 124 || $rc == 137 ]] && echo "!! $name hit its ${limit}s timeout" | tee -a "$log"
  SUMMARY+="$(printf '%-22s rc=%-4s %4ss (limit %ss)' "$name" "$rc" "$took" "$limit")"$'\n'
}

env_report() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  nproc: $(nproc)"
  uname -a
  free -g | head -2
  df -h /tmp | tail -1
  echo "cc: $(command -v cc || echo none)  gcc: $(command -v gcc || echo none)"
  if [[ $DRY == 0 ]]; then nvidia-smi || echo "!! nvidia-smi failed"; fi
  "$PY" - <<'PYEOF'
import importlib, os, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}",
          p.multi_processor_count, "SMs")
for name in ("triton", "transformers", "numpy", "zarr", "numcodecs", "google_crc32c", "pytest", "hypothesis",
             "matplotlib", "tqdm", "scipy", "tokenizers", "safetensors", "fastapi", "s3fs"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:<14}", getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:
        print(f"{name:<14} MISSING ({type(exc).__name__}: {exc})")
ok = True
for name in ("gradstore", "gradstore_kernels", "gradstore_kernels.ascent_triton", "gradstore_kernels.scoring_triton",
             "gradstore_unlearn.capture", "gradstore_unlearn.train"):
    try:
        mod = importlib.import_module(name)
        print(f"import {name}: ok ({os.path.relpath(mod.__file__)})")
    except Exception as exc:
        ok = False
        print(f"import {name}: FAILED ({type(exc).__name__}: {exc})")
sys.exit(0 if ok else 1)
PYEOF
}

export -f env_report
export DRY PY
run_step env "$ENV_TXT" 45 bash -c env_report

if [[ $DRY == 0 ]]; then
  run_step pytest_gpu "$OUT/pytest_gpu.log" 75 \
    "$PY" -m pytest -q -m gpu -rs --durations=8 tests/kernels tests/unlearn/test_capture_gpu.py
  # The deterministic kernel's launch constants, swept at 2M rows; the table below runs with the fastest.
  run_step ascent_tuning "$OUT/kernel_throughput.log" 120 \
    "$PY" benchmarks/ascent_tuning.py --device cuda --out "$OUT"
  TUNING=()
  for f in "$OUT"/ascent_tuning_*.json; do [[ -e "$f" ]] && TUNING=(--tuning "$f"); done
  # torch_compile last: compiling the reference at 2M rows is the slowest part (its chunk loop unrolls);
  # the JSON is rewritten after every row, and SIGTERM from the timeout writes what was measured.
  # No PNG here (the device tool brings back 8 files): draw it from the JSON afterwards.
  run_step kernel_throughput "$OUT/kernel_throughput.log" 120 \
    "$PY" benchmarks/kernel_throughput.py --device cuda --out "$OUT" --no-plot "${TUNING[@]}" \
    --providers torch_eager triton_det triton_atomic torch_compile
  # The per-example loss that capture records: one Triton pass vs torch.logsumexp (7% of a step before).
  run_step cross_entropy "$OUT/kernel_throughput.log" 60 \
    "$PY" benchmarks/cross_entropy_throughput.py --device cuda --out "$OUT"
  # Rounds of 5 arms x 15 steps; the 2nd and 3rd start only if they fit in 60 s of timed rounds (a slow
  # writer stretches the capture blocks), and the JSON is rewritten after every round.
  run_step capture_overhead "$OUT/capture_overhead.log" 110 \
    "$PY" benchmarks/capture_overhead.py --device cuda --size gpt2 --batch 16 --seq 512 \
    --steps 15 --blocks 3 --warmup 20 --budget-s 60 --out "$OUT"
else
  run_step pytest_gpu "$OUT/pytest_gpu.log" 90 \
    "$PY" -m pytest -q -m gpu -rs --durations=8 tests/kernels tests/unlearn/test_capture_gpu.py
  # The tuning sweep and --tuning / --no-plot, at toy sizes in the Triton interpreter.
  run_step ascent_tuning "$OUT/kernel_throughput.log" 150 env TRITON_INTERPRET=1 \
    "$PY" benchmarks/ascent_tuning.py --device cpu --quick --examples 2 --rows-per-example 32 --dim 48 \
    --vocab 500 --repeats 1 --out "$OUT"
  TUNING=()
  for f in "$OUT"/ascent_tuning_*.json; do [[ -e "$f" ]] && TUNING=(--tuning "$f"); done
  run_step kernel_throughput "$OUT/kernel_throughput.log" 150 \
    "$PY" benchmarks/kernel_throughput.py --device cpu --sizes 2 4 --repeats 2 --out "$OUT" --no-plot \
    "${TUNING[@]}" --providers torch_eager triton_det triton_atomic torch_compile
  run_step capture_overhead "$OUT/capture_overhead.log" 150 \
    "$PY" benchmarks/capture_overhead.py --device cpu --size tiny --batch 4 --seq 64 \
    --steps 2 --blocks 1 --warmup 1 --out "$OUT"
fi

# Optional: the Triton parity suite (small odd shapes, run under the interpreter on CPU) compiled for real.
left=$((BUDGET_S - SECONDS))
if [[ $DRY == 0 && $left -ge 45 ]]; then
  run_step pytest_triton_parity "$OUT/pytest_gpu.log" "$left" \
    "$PY" -m pytest -q -x -m "triton and not gpu" -rs tests/kernels
elif [[ $DRY == 1 ]]; then
  run_step pytest_triton_parity "$OUT/pytest_gpu.log" 60 \
    "$PY" -m pytest -q -x -m "triton and not gpu" -rs tests/kernels/test_triton_parity.py -k "score"
else
  SUMMARY+="pytest_triton_parity   skipped: ${left}s of the ${BUDGET_S}s budget left"$'\n'
fi

# ----------------------------------------------------------------------------------------------- summary
{
  echo
  echo "== steps ($SECONDS s in all)"
  printf '%s' "$SUMMARY"
  echo "== files in OUT"
  ls -la "$OUT"
} | tee -a "$ENV_TXT"
n_files=$(find "$OUT" -type f | wc -l)
[[ $n_files -gt 8 ]] && echo "!! $n_files files in OUT: the device tool brings back 8 at most" | tee -a "$ENV_TXT"
echo
echo "== capture overhead"
sed -n '/^arm /,/^MB per step/p' "$OUT/capture_overhead.log" 2>/dev/null
echo "== kernel throughput"
sed -n '/^ *rows provider/,$p' "$OUT/kernel_throughput.log" 2>/dev/null | grep -v "^wrote\|^no plot" | head -20
exit 0
