#!/usr/bin/env bash
# The full-size GPU figures in one or two device runs (see benchmarks/README.md).
#
#   bash benchmarks/gpu_session.sh fetch            # here: wheels the GPU image lacks, into .whl/
#   bash benchmarks/gpu_session.sh latency          # there: latency.py + unit_decoding.py at full size
#   bash benchmarks/gpu_session.sh memory [PREC...] # there: memory.py at 4bit (the target) or the precisions named
#
# The device image has torch, tokenizers, huggingface_hub, safetensors, rich and typer, but an
# older transformers (omni needs the `cache` keyword of 5.24's Llama, or the lookup that falls
# back), no bitsandbytes and no soundfile; those travel as wheels (about 60 MB, under the
# 64 MiB a run may carry). Output goes to $OUT when it is set, so it comes back.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  fetch)
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl \
      transformers==5.24.0 bitsandbytes==0.50.2 soundfile==0.14.0 cffi pycparser
    du -sh .whl
    ;;
  latency|memory)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    out="${OUT:-/tmp}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    if [ "$1" = latency ]; then
      python3 benchmarks/latency.py --size full --device cuda --chunk-units 10 40 --max-new-tokens 100 \
        --decode-steps eager static compiled --temperature 1 --units-per-token 8 2>"$out/latency.err" | tee "$out/latency.jsonl"
      python3 benchmarks/unit_decoding.py --size full --device cuda --dtype bfloat16 2>"$out/unit_decoding.err" \
        | tee "$out/unit_decoding.jsonl"
    else
      shift
      for precision in "${@:-4bit}"; do
        python3 benchmarks/memory.py --size full --device cuda --precision "$precision" --max-new-tokens 100 --decode-steps static \
          --workdir /tmp/omni-full 2>>"$out/memory.err" | tee -a "$out/memory.jsonl"
      done
    fi
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh fetch|latency|memory" >&2
    exit 2
    ;;
esac
