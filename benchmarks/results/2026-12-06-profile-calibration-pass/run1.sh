# Call 1: one GLM-4.7-dims MoE layer + MTP, GS128: the MoE layer's calibration pass profiled alone at
# $PROF (64) x 2048, then timed at $SAMPLES (512) x 2048, on one machine. Args: extra profile_layer
# arguments for both runs (e.g. --awq KEY=VALUE).
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
(cat .whl/commit.txt; date; nvidia-smi; nproc; free -g) > $R/machine.txt 2>&1
[ -f /dev/shm/syn/release.yaml ] || python -m benchmarks.synthetic --preset glm47 --layers 1 --dense 0 --device cuda \
  --out /dev/shm/syn --group-size 128 --samples ${SAMPLES:-512} --seq 2048 > $R/synthetic.log 2>&1
echo "synthetic rc=$? at $(( $(date +%s) - t0 )) s"
TAG=${TAG:-base}
timeout $(( ${BUDGET:-590} - ($(date +%s) - t0) )) python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml \
  --samples ${SAMPLES:-512} --profile-samples ${PROF:-64} --profile-calibrating 2 "$@" \
  --json $R/$TAG.json --tables $R/$TAG-tables.txt > $R/$TAG.log 2>&1
echo "$TAG rc=$? at $(( $(date +%s) - t0 )) s"
tail -5 $R/$TAG.log
