# Call 1: where the host waits for the GPU in the MoE layer's calibration pass (torch's sync debug
# mode, 8 samples), then this tree against the base tree (.whl/base.tar, `git archive` of the commit
# in .whl/base.txt) timed at 256 x 2048, new-base-new, with their chosen scales compared.
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R /tmp/base && tar -xf .whl/base.tar -C /tmp/base
(cat .whl/commit.txt .whl/base.txt; date; nvidia-smi; nproc; free -g) > $R/machine.txt 2>&1
export PYTHONPATH=/tmp/site:$PWD
NEW=$PWD
[ -f /dev/shm/syn/release.yaml ] || python -m benchmarks.synthetic --preset glm47 --layers 1 --dense 0 --device cuda \
  --out /dev/shm/syn --group-size 128 --samples 256 --seq 2048 > $R/synthetic.log 2>&1
echo "synthetic rc=$? at $(( $(date +%s) - t0 )) s"
left() { echo $(( 400 - ($(date +%s) - t0) )); }
timeout $(left) python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml --samples 0 --profile-samples 0 \
  --sync-samples 8 --profile-calibrating 2 --json $R/syncs-8.json > $R/syncs-8.log 2>&1
echo "syncs rc=$? at $(( $(date +%s) - t0 )) s"
for tree in new base new2; do
  [ "$(left)" -lt 75 ] && { echo "no time left for $tree"; break; }
  if [ $tree = base ]; then cd /tmp/base; export PYTHONPATH=/tmp/site:/tmp/base; else cd $NEW; export PYTHONPATH=/tmp/site:$NEW; fi
  timeout $(left) python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml --samples 256 --profile-samples 0 \
    --scales /dev/shm/$tree-scales.pt --json $R/$tree-256.json > $R/$tree-256.log 2>&1
  echo "$tree rc=$? at $(( $(date +%s) - t0 )) s"
done
cd $NEW; export PYTHONPATH=/tmp/site:$NEW
python -m benchmarks.profile_layer --compare /dev/shm/base-scales.pt /dev/shm/new-scales.pt > $R/compare-scales.txt 2>&1
head -30 $R/compare-scales.txt
python3 -c "
import json,sys
for n in ['syncs-8','new-256','base-256','new2-256']:
    try: d=json.load(open('$R/'+n+'.json'))
    except Exception as e: print(n,'missing',e); continue
    for m,r in d.items():
        if 'sync_sites' in r: print(n,'syncs',r['syncs_total']); [print('  ',x) for x in r['sync_sites'][:12]]
        if 'layers' in r: print(n,m,[(l.get('calib_s'),l.get('smooth_s'),l.get('gpu_util_calib_pct')) for l in r['layers']], r.get('oneshot_s'), r.get('passes'))
"
