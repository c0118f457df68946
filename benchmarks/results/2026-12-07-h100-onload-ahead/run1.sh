# Onload-ahead timed (issue 28 item 3/1): this tree with onload-ahead on (new, the default), the same
# tree with it off (off: --engine onload_ahead=[]), and the base tree (11e2861, before onload-ahead:
# .whl/base.tar) on 2 GLM-4.7-dims MoE layers + MTP at 256 x 2048, GS128; chosen scales compared.
# TREES and LIMIT (seconds for the whole script) choose what runs.
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; [ -d /tmp/base ] || { mkdir -p /tmp/base && tar -xf .whl/base.tar -C /tmp/base; }
NEW=$PWD
export PYTHONPATH=/tmp/site:$NEW
(cat .whl/commit.txt .whl/base.txt; date; nvidia-smi; nproc; free -g) > $R/machine.txt 2>&1
python3 -c "import torch, transformers, llmcompressor, compressed_tensors, datasets, pydantic, git, pyarrow; print(torch.__version__, transformers.__version__, llmcompressor.__version__, compressed_tensors.__version__, datasets.__version__, pyarrow.__version__)" 2>&1 | tail -3 | tee $R/versions.txt
[ -f /dev/shm/syn/release.yaml ] || python3 -m benchmarks.synthetic --preset glm47 --layers 2 --dense 0 --device cuda \
  --out /dev/shm/syn --group-size 128 --samples 256 --seq 2048 > $R/synthetic.log 2>&1
echo "synthetic rc=$? at $(( $(date +%s) - t0 )) s"; tail -3 $R/synthetic.log 2>/dev/null
left() { echo $(( ${LIMIT:-560} - ($(date +%s) - t0) )); }
for tree in ${TREES:-new base off}; do
  [ "$(left)" -lt 120 ] && { echo "no time left for $tree"; break; }
  extra=""
  case $tree in base*) cd /tmp/base; export PYTHONPATH=/tmp/site:/tmp/base;; off*) extra="--engine onload_ahead=[]"; cd $NEW; export PYTHONPATH=/tmp/site:$NEW;; *) cd $NEW; export PYTHONPATH=/tmp/site:$NEW;; esac
  timeout $(left) python3 -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml --samples 256 --profile-samples 0 \
    $extra --scales /dev/shm/$tree-scales.pt --json $R/$tree-256.json > $R/$tree-256.log 2>&1
  echo "$tree rc=$? at $(( $(date +%s) - t0 )) s"; [ -s $R/$tree-256.json ] || tail -5 $R/$tree-256.log
done
cd $NEW; export PYTHONPATH=/tmp/site:$NEW
for t in base off new2 off2; do [ -f /dev/shm/$t-scales.pt ] && [ -f /dev/shm/new-scales.pt ] && \
  python3 -m benchmarks.profile_layer --compare /dev/shm/new-scales.pt /dev/shm/$t-scales.pt > $R/compare-new-$t.txt 2>&1 && { echo "new vs $t:"; grep -v '^ ' $R/compare-new-$t.txt | head -8; }; done
python3 -c "
import json,glob,os
for f in sorted(glob.glob('$R/*-256.json')):
    d=json.load(open(f))
    for m,r in d.items():
        if not isinstance(r,dict) or 'layers' not in r: continue
        print(os.path.basename(f), m, [(l.get('calib_s'),l.get('smooth_s'),l.get('gpu_util_calib_pct'),l.get('peak_gpu_gib')) for l in r['layers']], 'oneshot', r.get('oneshot_s'), 'load', r.get('load_s'), 'passes', r.get('passes'), 'ahead', r.get('onload_ahead'))
"
