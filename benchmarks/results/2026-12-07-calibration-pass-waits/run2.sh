# Call 2 (same warm machine as call 1, its /dev/shm/syn kept): the working tree (ExpertHooks: the
# chunk's hooks read once) against the base tree (.whl/base.tar) at 256 x 2048, base-new-base-new.
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; rm -rf /tmp/base2; mkdir -p /tmp/base2 && tar -xf .whl/base.tar -C /tmp/base2
(cat .whl/commit.txt .whl/base.txt; date; nvidia-smi; ls /dev/shm/syn) > $R/machine.txt 2>&1
NEW=$PWD
left() { echo $(( 330 - ($(date +%s) - t0) )); }
for tree in base new base2 new2; do
  [ "$(left)" -lt 62 ] && { echo "no time left for $tree"; break; }
  if [ ${tree%2} = base ]; then cd /tmp/base2; export PYTHONPATH=/tmp/site:/tmp/base2; else cd $NEW; export PYTHONPATH=/tmp/site:$NEW; fi
  timeout $(left) python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml --samples 256 --profile-samples 0 \
    --scales /dev/shm/c2-$tree-scales.pt --json $R/$tree-256.json > $R/$tree-256.log 2>&1
  echo "$tree rc=$? at $(( $(date +%s) - t0 )) s"
done
cd $NEW; export PYTHONPATH=/tmp/site:$NEW
python -m benchmarks.profile_layer --compare /dev/shm/c2-base-scales.pt /dev/shm/c2-new-scales.pt > $R/compare-scales.txt 2>&1
grep -c '"equal"' $R/compare-scales.txt; python3 -c "
import json
for n in ['base-256','new-256','base2-256','new2-256']:
    try: d=json.load(open('$R/'+n+'.json'))
    except Exception as e: print(n,'missing'); continue
    for m,r in d.items(): print(n, [(l.get('calib_s'),l.get('smooth_s'),l.get('gpu_util_calib_pct')) for l in r['layers']], r.get('oneshot_s'), r.get('passes'))
"
