#!/usr/bin/env bash
# The whole GPU session (issue 14) in one device call, and its rehearsal on a CPU.
# benchmarks/README.md gives the exact device-tool call.
#
#   bash benchmarks/gpu_session.sh fetch           # here: the wheels the device image lacks, into .whl/
#   bash benchmarks/gpu_session.sh check-wheels    # here: they install with --no-index into clean dirs and import
#   bash benchmarks/gpu_session.sh prewrite suite latency unit-decoding memory   # on the device, in this order:
#       prewrite:      memory.py's full-size checkpoint (~18 GB) written in the background (CPU and disk);
#       suite:         tests/gpu, the CUDA suite;
#       latency:       latency.py (full size, Ω 10 and 40, eager/static/compiled);
#       unit-decoding: unit_decoding.py (full size, bf16);
#       memory:        memory.py at 4bit on that checkpoint, then fp16 if the budget allows (`memory fp16` etc. to choose)
#   bash benchmarks/gpu_session.sh --rehearse prewrite suite latency unit-decoding memory   # here: the same, tiny, CPU
#
# The device image (Python 3.12, torch 2.11 + CUDA 13) has torch, tokenizers, huggingface_hub,
# safetensors, accelerate, rich, typer, scipy, pytest, but transformers 5.17 (omni needs >= 5.23),
# no bitsandbytes, no soundfile/cffi, and peft/regex of unknown versions: those travel as wheels
# (~57 MiB, under the 64 MiB a call may carry, with the repository's ~2 MB). Everything a
# phase writes goes to $OUT (at most 8 files come back): session.txt (environment, then each
# phase's seconds and exit status), suite.log, gpu_suite.jsonl, latency.jsonl,
# unit_decoding.jsonl, memory.jsonl, bench.log (the benchmarks' stderr).
#
# Each phase runs under `timeout` within the call's budget (CALL_BUDGET seconds from the start,
# default 570: a device call may run 600 s), so a slow phase is cut, not the call: pytest is
# interrupted with SIGINT and still prints what ran; a benchmark keeps the rows it printed.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(transformers==5.24.0 bitsandbytes==0.50.2 peft==0.21.2 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 regex==2026.11.19)
START=$SECONDS
REHEARSE=0
if [ "${1:-}" = --rehearse ]; then
  REHEARSE=1
  shift
fi
# A 2-core CPU runs the same phases several times slower than the GPU machine: the rehearsal
# scales every phase's time cap (CAP_SCALE) and has an hour.
BUDGET=${CALL_BUDGET:-$([ $REHEARSE = 1 ] && echo 3600 || echo 570)}
CAP_SCALE=${CAP_SCALE:-$([ $REHEARSE = 1 ] && echo 5 || echo 1)}

if [ $REHEARSE = 1 ]; then
  # The same phases on this CPU: the tiny model, the suite's CPU subset (OMNI_TEST_DEVICE=cpu).
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  SIZE=tiny DEVICE=cpu
  export OMNI_TEST_DEVICE=cpu
  OUT=${OUT:-out/rehearsal}
else
  PY=${PYTHON:-python3}
  SIZE=full DEVICE=cuda
  OUT=${OUT:-/tmp/omni-gpu-session}
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
STATUS=0

log() { echo "$*" | tee -a "$OUT/session.txt"; }

left() { echo $((BUDGET - (SECONDS - START))); }

# phase NAME CAP OUTFILE COMMAND...: run COMMAND (stdout appended to $OUT/OUTFILE, stderr to
# $OUT/bench.log, or both to OUTFILE when it ends in .log) under timeout min(CAP × CAP_SCALE,
# budget left - 10 s); log its seconds and exit status. No pipe: SIGINT reaches the whole process group
# and a `| tee` would die before pytest prints its summary.
phase() {
  local name=$1 cap=$2 outfile=$OUT/$3
  shift 3
  local limit errfile=$OUT/bench.log
  [[ $outfile == *.log ]] && errfile=$outfile
  cap=$((cap * CAP_SCALE))
  limit=$(left)
  limit=$((limit - 10 < cap ? limit - 10 : cap))
  if [ "$limit" -lt 30 ]; then
    log "phase $name: skipped, $(left) s left of the call's ${BUDGET} s"
    STATUS=1
    return
  fi
  local t0=$SECONDS rc=0
  timeout -s INT -k 30 "$limit" "$@" >>"$outfile" 2>>"$errfile" || rc=$?
  tail -n 25 "$outfile"
  log "phase $name: $((SECONDS - t0)) s, exit $rc$([ $rc = 124 ] && echo " (cut at ${limit} s)")"
  [ $rc = 0 ] || STATUS=1
}

# What runs where: versions as imported (the carried wheels must win over the image's copies).
environment() {
  {
    date -u +%FT%TZ
    echo "mode: $([ $REHEARSE = 1 ] && echo "rehearsal (--size tiny --device cpu)" || echo device), budget ${BUDGET} s, caps x${CAP_SCALE}"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "soundfile", "huggingface_hub", "tokenizers"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
EOF
  } 2>&1 | tee -a "$OUT/session.txt"
}

install_wheels() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run 'bash benchmarks/gpu_session.sh fetch' here and carry .whl" >&2
    exit 2
  fi
  # A machine still warm from an earlier call has them already.
  local stamp
  stamp=$(ls .whl)
  if [ "$(cat /tmp/site/.omni-wheels 2>/dev/null)" != "$stamp" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    echo "$stamp" >/tmp/site/.omni-wheels
  fi
  export PYTHONPATH="/tmp/site:$PWD"
}

suite() {
  # The CUDA suite (tests/gpu) first: each case appends its figures to $OUT/gpu_suite.jsonl.
  # On the device its five groups of cases run side by side (pytest-xdist is in the image):
  # each case is a few `omni` processes, mostly starting Python and torch, on 16 cores and an
  # H200 that the tiny and mid-size models barely use. The rehearsal runs them one by one.
  local workers=${SUITE_WORKERS:-$([ $REHEARSE = 1 ] && echo 0 || echo 5)} parallel=()
  if [ "$workers" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n "$workers" --dist loadgroup); fi
  # shellcheck disable=SC2086 # SUITE_ARGS: extra pytest arguments, e.g. -m "not slow" for a quick rehearsal
  phase suite 210 suite.log "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider --durations=15 "${parallel[@]}" ${SUITE_ARGS:-}
}

latency() {
  phase latency 170 latency.jsonl "$PY" benchmarks/latency.py --size $SIZE --device $DEVICE --chunk-units 10 40 \
    --max-new-tokens 100 --decode-steps eager static compiled --temperature 1 --units-per-token 8
}

unit_decoding() {
  # One JSON line at the end: a cut run leaves nothing, hence its own phase and cap.
  phase unit-decoding 45 unit_decoding.jsonl "$PY" benchmarks/unit_decoding.py --size $SIZE --device $DEVICE --dtype bfloat16
}

# memory.py's checkpoint (~18 GB at full size), written in the background while the GPU works on
# the other phases: CPU and disk work only. A later call on the still-warm machine finds it
# complete and skips the writing; on a fresh machine memory.py writes it itself. The lock keeps
# memory.py from starting on a half-written one.
prewrite() {
  local spec=None
  [ $SIZE = full ] && spec="memory.FullSpec.from_preset(None, None)"
  # Four threads: the suite's and the benchmarks' processes keep the other twelve cores.
  OMP_NUM_THREADS=4 setsid nohup flock "/tmp/omni-$SIZE.lock" "$PY" -c "
import sys; from pathlib import Path
sys.path.insert(0, 'benchmarks'); import memory
memory.prepare_checkpoint('$SIZE', Path('/tmp/omni-$SIZE'), $spec, 0)  # memory.py's defaults: seed 0, full depth
print('prewrite finished', flush=True)
" >/tmp/omni-prewrite.log 2>&1 </dev/null &
  sleep 2  # the writer holds the lock before any memory phase asks for it
  log "phase prewrite: writing memory.py's $SIZE checkpoint to /tmp/omni-$SIZE in the background (log: /tmp/omni-prewrite.log)"
}

memory() {
  local precisions=("$@")
  if [ $REHEARSE = 1 ]; then
    # omni refuses 8bit/4bit off CUDA (and memory.py with it): the rehearsal measures fp32.
    precisions=(fp32)
  elif [ ${#precisions[@]} = 0 ]; then
    precisions=(4bit fp16)  # 4bit is the target; fp16 only if the budget still allows
  fi
  # The background writer (prewrite, earlier in this call or in an earlier one on this machine): wait for it, keep its log.
  phase memory-wait-for-prewrite 150 bench.log flock "/tmp/omni-$SIZE.lock" sh -c "cat /tmp/omni-prewrite.log 2>/dev/null; true"
  local first=1
  for precision in "${precisions[@]}"; do
    if [ $first = 0 ] && [ "$(left)" -lt 100 ]; then
      log "phase memory-$precision: skipped, $(left) s left"
      continue
    fi
    first=0
    phase "memory-$precision" 200 memory.jsonl "$PY" benchmarks/memory.py --size $SIZE --device $DEVICE \
      --precision "$precision" --max-new-tokens 100 --decode-steps static --workdir "/tmp/omni-$SIZE"
  done
}

fetch() {
  grep -qxF '/.whl/' .gitignore || { echo "/.whl/ must be in .gitignore (it travels only as carry)" >&2; exit 2; }
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" || exit 1
  du -sh .whl
}

# The carried wheels install offline into clean directories and import: the Python 3.12 ones
# (cffi, regex) under a Python 3.12 here, the pure ones next to this venv's torch.
check_wheels() {
  local py312="" tmp candidate
  for candidate in ${PY312:-} python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
    # A pyenv shim answers to the name but may not run: ask each for its version.
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py312=$candidate; break; fi
  done
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  [ "$(ls .whl/*.whl | wc -l)" = ${#WHEELS[@]} ] || { echo "expected ${#WHEELS[@]} wheels in .whl/ (one version each)" >&2; return 1; }
  if [ -n "$py312" ]; then
    "$py312" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/py312" .whl/*.whl || return 1
    PYTHONPATH="$tmp/py312" "$py312" -c "import cffi, _cffi_backend, pycparser, regex; print('python 3.12: all wheels install; cffi', cffi.__version__, 'regex', regex.__version__)" || return 1
  else
    echo "no python3.12 here: the cp312 wheels (cffi, regex) are unchecked" >&2
  fi
  local pure=()
  for w in .whl/*.whl; do case $w in *-py3-none-* | *-py2.py3-none-*) pure+=("$w") ;; esac; done
  local venv=${PYTHON:-.venv/bin/python}
  "$venv" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/pure" "${pure[@]}" || return 1
  PYTHONPATH="$tmp/pure" "$venv" - "$tmp/pure" <<'EOF' || return 1
import sys
import bitsandbytes, peft, soundfile, transformers
for m in (transformers, bitsandbytes, peft, soundfile):
    assert m.__file__.startswith(sys.argv[1]), f"{m.__name__} came from {m.__file__}, not the installed wheel"
    print(m.__name__, m.__version__, "imports from the wheel")
EOF
}

if [ $# = 0 ]; then
  echo "usage: bash benchmarks/gpu_session.sh fetch | check-wheels | [--rehearse] prewrite|suite|latency|unit-decoding|memory [PREC...]..." >&2
  exit 2
fi
case $1 in
  fetch) fetch; exit ;;
  check-wheels) check_wheels; exit ;;
esac

[ $REHEARSE = 1 ] || install_wheels
environment
while [ $# -gt 0 ]; do
  case $1 in
    prewrite) prewrite; shift ;;
    suite) suite; shift ;;
    latency) latency; shift ;;
    unit-decoding) unit_decoding; shift ;;
    memory)
      shift
      precisions=()
      while [ $# -gt 0 ] && [[ $1 =~ ^(fp32|fp16|bf16|8bit|4bit|auto)$ ]]; do precisions+=("$1"); shift; done
      memory "${precisions[@]}"
      ;;
    *) echo "unknown phase '$1': prewrite, suite, latency, unit-decoding or memory" >&2; exit 2 ;;
  esac
done
log "total: $((SECONDS - START)) s, status $STATUS"
exit $STATUS
