# one GLM-4.7-dims MoE layer + MTP, $SAMPLES (512) x 2048, one pass of three group sizes: the whole grid
# (with the window replayed from its losses), then side_grid_window=2, on one machine
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
(cat .whl/commit.txt; date; nvidia-smi; nproc; free -g) > $R/machine.txt 2>&1
python -m benchmarks.synthetic --preset glm47 --layers 1 --dense 0 --device cuda --out /dev/shm/syn \
  --group-size 32 --group-size 64 --group-size 128 --samples ${SAMPLES:-512} --seq 2048 > $R/synthetic.log 2>&1
echo "synthetic rc=$? at $(( $(date +%s) - t0 )) s"
for run in "$@"; do
  IFS=: read TAG SET <<< "$run"
  s=$(date +%s)
  timeout $(( 595 - ($(date +%s) - t0) )) python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml \
    --samples ${SAMPLES:-512} --profile-samples 0 --one-pass $SET --scales $R/$TAG-scales.pt --json $R/$TAG.json > $R/$TAG.log 2>&1
  echo "$TAG rc=$? in $(( $(date +%s) - s )) s, at $(( $(date +%s) - t0 )) s"
done
python -m benchmarks.profile_layer --compare $R/full-scales.pt $R/w2-scales.pt > $R/compare-lead.txt 2>&1
rm -f $R/*.pt
tar czf $OUT/r.tgz -C $OUT r && rm -rf $R
