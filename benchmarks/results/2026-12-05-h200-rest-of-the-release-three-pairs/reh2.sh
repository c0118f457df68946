# rehearsals of build-all (3 branches, one pass) on GLM-4.7-dims synthetic models: "TAG:DIR:LAYERS" ...
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; ROOT=$PWD
(cat .whl/commit.txt; date; nvidia-smi; nproc; free -g; df -h /dev/shm) > $R/machine.txt 2>&1
for spec in "$@"; do
  IFS=: read TAG DIR L <<< "$spec"
  rm -rf /dev/shm/reh /dev/shm/glmrel-store
  cd $ROOT/$DIR
  s=$(date +%s)
  PYTHONPATH=/tmp/site:$PWD timeout $(( 590 - ($(date +%s) - t0) )) python -m benchmarks.rehearsal --layers $L --samples 4 --seq 2048 \
    --work /dev/shm/reh --pass-store /dev/shm/glmrel-store --stages model,build --json $R/$TAG-rehearsal-$L.json > $R/$TAG-rehearsal-$L.log 2>&1
  echo "$TAG L=$L rc=$? in $(( $(date +%s) - s )) s, at $(( $(date +%s) - t0 )) s"
  grep "build-all  " $R/$TAG-rehearsal-$L.log | tail -1
  mkdir -p $R/$TAG-build-log-$L; cp /dev/shm/reh/branches/.glmrel-cache/build-log/*.json $R/$TAG-build-log-$L/ 2>/dev/null
  cd $ROOT
done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $R
