# Call 2: the MoE layer's calibration pass profiled by the Python functions that called each
# operator (8 x 2048, --stacks), then this tree against the base tree (.whl/base.tar, `git archive`
# of the commit named in .whl/base.txt) timed at 512 x 2048 with their chosen scales compared.
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R /tmp/base && tar -xf .whl/base.tar -C /tmp/base
(cat .whl/commit.txt .whl/base.txt; date; nvidia-smi; nproc; free -g) > $R/machine.txt 2>&1
export PYTHONPATH=/tmp/site:$PWD
[ -f /dev/shm/syn/release.yaml ] || python -m benchmarks.synthetic --preset glm47 --layers 1 --dense 0 --device cuda \
  --out /dev/shm/syn --group-size 128 --samples 512 --seq 2048 > $R/synthetic.log 2>&1
echo "synthetic rc=$? at $(( $(date +%s) - t0 )) s"
left() { echo $(( 590 - ($(date +%s) - t0) )); }
timeout $(left) python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml --samples 0 --profile-samples 8 \
  --profile-calibrating 2 --stacks --json $R/stacks-8.json > $R/stacks-8.log 2>&1
echo "stacks rc=$? at $(( $(date +%s) - t0 )) s"
for tree in new base; do
  [ $tree = base ] && cd /tmp/base && export PYTHONPATH=/tmp/site:/tmp/base
  timeout $(left) python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml --samples 512 --profile-samples 0 \
    --scales /dev/shm/$tree-scales.pt --json $R/$tree-512.json > $R/$tree-512.log 2>&1
  echo "$tree rc=$? at $(( $(date +%s) - t0 )) s"
done
python -m benchmarks.profile_layer --compare /dev/shm/base-scales.pt /dev/shm/new-scales.pt > $R/compare-scales.txt 2>&1
cat $R/compare-scales.txt | head -40
