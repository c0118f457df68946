# offload.cpu_gib against in RAM (issue 28 item 3), with onload-ahead on (this tree's default):
# GLM-4.7 dims, 1 dense + 1 MoE layer + MTP, N x 2048 (default 512), GS128, the page cache dropped
# before each mode, the offloaded mode under a cgroup memory.max below the model's size.
# MODES picks the modes (ram,offload); a model already in the work folder is reused.
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
R=$OUT/r; mkdir -p $R; W=/var/tmp/glmrel-offw
(git rev-parse HEAD; date; nvidia-smi; nproc; free -g; df -h /var/tmp) > $R/machine2.txt 2>&1
reuse=""; [ -f $W/release.yaml ] && reuse="--reuse"
for m in $(echo ${MODES:-ram,offload} | tr , ' '); do
  timeout $(( ${LIMIT:-560} - ($(date +%s) - t0) )) python3 -m benchmarks.offload --preset glm47 --layers 2 --samples ${N:-512} --seq 2048 \
    --cpu-gib 4 --enforce --drop-caches --work $W --modes $m $reuse --json /var/tmp/offload-${N:-512}.json > $R/offload-$m.log 2>&1
  echo "$m rc=$? at $(( $(date +%s) - t0 )) s"; reuse="--reuse"; tail -4 $R/offload-$m.log
done
cp /var/tmp/offload-${N:-512}.json $R/; python3 -c "
import json
d=json.load(open('/var/tmp/offload-${N:-512}.json'))
for r in d['runs']: print({k: v for k, v in r.items() if not isinstance(v, (list, dict))})
"
