#!/usr/bin/env bash
# Multi-GPU check on a GPU machine: `glmrel quantize --gpus N` end to end on the tiny model
# (build, verify, check), then benchmarks.scale's 1-GPU vs N-GPU comparison (time per layer,
# and how far the chosen AWQ scales moved) at the sizes given.
#   bash benchmarks/gpus_check.sh N OUT_DIR [SCALE ARGS...]
# e.g. bash benchmarks/gpus_check.sh 2 /tmp/gpus --preset glm47 --layers 2 --samples 32 --seq 2048
set -uo pipefail
n=$1; out=$2; shift 2
mkdir -p "$out"
nvidia-smi -L
python3 -m benchmarks.synthetic --preset tiny --out /tmp/gpus-tiny --samples 16 --seq 256 --device cuda || exit 1
cfg=/tmp/gpus-tiny/release.yaml
t=$(date +%s)
timeout 300 python3 -m release.cli quantize --config $cfg --branch W4A16_GS128 --gpus "$n" 2>&1 | tee "$out/quantize.log" | grep -v "it/s\]" | tail -40
echo "quantize --gpus $n: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t )) s"
python3 -m release.cli verify --config $cfg --branch W4A16_GS128 2>&1 | tail -5
python3 -m release.cli check /tmp/gpus-tiny/branches/W4A16_GS128 2>&1 | tail -3
python3 -c "import json,sys; p=json.load(open('/tmp/gpus-tiny/branches/W4A16_GS128/provenance.json')); print('provenance gpus', p['gpus'], 'timings', p['timings_s'])"
if [ $# -gt 0 ]; then
  timeout 400 python3 -m benchmarks.scale "$@" --engines glmrel --gpus "$n" --device cuda --work /tmp/gpus-bench --json "$out/scale-gpus.json"
  echo "scale --gpus $n: exit $?"
fi
