# cProfile of build-all (3 branches, one pass) on a GLM-4.7-dims synthetic model of $L layers
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
L=${L:-3}; S=${S:-4}
(cat .whl/commit.txt; date; nvidia-smi; nproc; free -g; df -h /dev/shm) > $R/machine-$L.txt 2>&1
rm -rf /dev/shm/reh /dev/shm/glmrel-store
python -m benchmarks.rehearsal --layers $L --samples $S --seq 2048 --work /dev/shm/reh --pass-store /dev/shm/glmrel-store --stages model > $R/model-$L.log 2>&1
echo "model rc=$? at $(( $(date +%s) - t0 )) s"
t1=$(date +%s)
timeout $(( 585 - ($(date +%s) - t0) )) python -m cProfile -o $R/build-all-$L.prof -m release.cli build-all --config /dev/shm/reh/release.yaml > $R/build-all-$L.log 2>&1
echo "build-all rc=$? wall $(( $(date +%s) - t1 )) s"
python - <<PY > $R/prof-$L.txt 2>&1
import pstats
p = pstats.Stats("$R/build-all-$L.prof")
p.sort_stats("cumulative").print_stats(90)
p.sort_stats("tottime").print_stats(50)
PY
head -c 20000 $R/prof-$L.txt | tail -c 9000
cp -r /dev/shm/reh/branches/.glmrel-cache/build-log $R/build-log-$L 2>/dev/null
tar czf $OUT/p.tgz -C $OUT r && rm -rf $R
