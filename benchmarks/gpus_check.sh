#!/usr/bin/env bash
# Multi-GPU check on a GPU machine: the same branch built by `glmrel quantize` on one GPU and
# with `--gpus N`, both verified against the base model; the N-GPU branch must match the
# one-GPU branch's KL within 2 % (+1e-5) and pass `check`. Then, with extra arguments,
# benchmarks.scale's 1-GPU vs N-GPU timing at the size given.
#   bash benchmarks/gpus_check.sh N OUT_DIR [SCALE ARGS...]
# e.g. bash benchmarks/gpus_check.sh 2 /tmp/gpus --preset glm47 --layers 2 --samples 64 --seq 2048
set -uo pipefail
n=$1; out=$2; shift 2
mkdir -p "$out"
nvidia-smi -L 2>/dev/null
w=/tmp/gpus-tiny
python3 -m benchmarks.synthetic --preset tiny --out $w --samples 16 --seq 256 --device "${DEVICE:-cuda}" >/dev/null || exit 1
sed "s#$w/branches#$w/branches-1gpu#" $w/release.yaml > $w/release-1gpu.yaml
for run in 1gpu ngpu; do
  cfg=$w/release.yaml; args=(--gpus "$n")
  [ $run = 1gpu ] && { cfg=$w/release-1gpu.yaml; args=(); }
  t=$(date +%s)
  timeout 300 python3 -m release.cli quantize --config $cfg --branch W4A16_GS128 "${args[@]}" > "$out/quantize-$run.log" 2>&1
  echo "quantize $run: exit $? in $(( $(date +%s) - t )) s"
  python3 -m release.cli verify --config $cfg --branch W4A16_GS128 --json > "$out/verify-$run.json" 2>/dev/null
  echo "verify $run: exit $?"
done
python3 - "$out" "$n" <<'PY'
import json, sys
out, n = sys.argv[1], sys.argv[2]
one, many = (json.load(open(f"{out}/verify-{r}.json"))["quality"] for r in ("1gpu", "ngpu"))
ok = abs(many["mean_kl"] - one["mean_kl"]) <= 0.02 * one["mean_kl"] + 1e-5
print(f"KL 1 GPU {one['mean_kl']:.6f} top-1 {one['top1_agreement']:.4f}; {n} GPUs {many['mean_kl']:.6f} "
      f"top-1 {many['top1_agreement']:.4f}: {'SAME within 2 %' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
PY
echo "kl compare: exit $?"
python3 -m release.cli check $w/branches/W4A16_GS128 2>&1 | tail -2
if [ $# -gt 0 ]; then
  timeout 400 python3 -m benchmarks.scale "$@" --engines glmrel --gpus "$n" --device cuda --work /tmp/gpus-bench --json "$out/scale-gpus.json"
  echo "scale --gpus $n: exit $?"
fi
