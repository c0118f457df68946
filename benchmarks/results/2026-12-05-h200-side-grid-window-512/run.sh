# one GLM-4.7-dims MoE layer + MTP, 512 x 2048, one pass of three group sizes, one H200, in two calls
# on one warm machine (each call's limit is 10 min): `run.sh full:` then `run.sh "w2:--awq side_grid_window=2"`.
# The synthetic model and the scales stay in /dev/shm between the calls; once full.pt and w2.pt both exist,
# a call compares the propagating branch's scales of the two. Session 29 ran a third call for the noise:
# `run.sh "w2b:--awq side_grid_window=2" full2:`.
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R /dev/shm/scales
(cat .whl/commit.txt; date; nvidia-smi; nproc; free -g) > $R/machine.txt 2>&1
if [ ! -f /dev/shm/syn/release.yaml ]; then
  python -m benchmarks.synthetic --preset glm47 --layers 1 --dense 0 --device cuda --out /dev/shm/syn \
    --group-size 32 --group-size 64 --group-size 128 --samples 512 --seq 2048 > $R/synthetic.log 2>&1
  echo "synthetic rc=$? at $(( $(date +%s) - t0 )) s"
fi
for run in "$@"; do
  IFS=: read TAG SET <<< "$run"
  s=$(date +%s)
  nvidia-smi --query-gpu=utilization.gpu,memory.used,power.draw --format=csv,noheader -l 1 > $R/$TAG-smi.csv &
  smi=$!
  timeout $(( 590 - ($(date +%s) - t0) )) python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml \
    --samples 512 --profile-samples 0 --one-pass $SET --scales /dev/shm/scales/$TAG.pt --json $R/$TAG.json > $R/$TAG.log 2>&1
  echo "$TAG rc=$? in $(( $(date +%s) - s )) s, at $(( $(date +%s) - t0 )) s"
  kill $smi
done
if [ -f /dev/shm/scales/full.pt ] && [ -f /dev/shm/scales/w2.pt ]; then
  python -m benchmarks.profile_layer --compare /dev/shm/scales/full.pt /dev/shm/scales/w2.pt > $R/compare-lead.txt 2>&1
fi
tar czf $OUT/r.tgz -C $OUT r && rm -rf $R
