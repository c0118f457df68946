# Session 40, call 1: the rotary kernel's GPU test, its attention timing against transformers',
# a profile of both, then the synthetic model for call 2's engine A/B.
set -u; t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
R=$OUT/r; mkdir -p $R
(git rev-parse HEAD; git status --porcelain | wc -l; echo "code $(find release benchmarks -name '*.py' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"; date; nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)") > $R/machine.txt 2>&1
python3 -m pytest -q -p no:cacheprovider -rs tests/test_rope.py -k "not interpreter" > $R/test_rope.log 2>&1; echo "test_rope rc=$? at $(( $(date +%s) - t0 )) s"; tail -5 $R/test_rope.log
python3 -m benchmarks.search_forward --preset glm47 --device cuda --batches 8 --grid 3 --parts attention --mask none --rope stock,fused,stock,fused --json $R/rope.json > $R/rope.log 2>&1; echo "rope rc=$? at $(( $(date +%s) - t0 )) s"; tail -12 $R/rope.log
timeout 120 python3 -m benchmarks.search_forward --preset glm47 --device cuda --batches 8 --grid 1 --parts attention --mask none --rope stock,fused --profile --rows 20 > $R/rope-profile.log 2>&1; echo "profile rc=$? at $(( $(date +%s) - t0 )) s"
if [ ! -f /dev/shm/syn/release.yaml ]; then
  timeout $(( 560 - ($(date +%s) - t0) )) python3 -m benchmarks.synthetic --preset glm47 --layers 2 --dense 0 --device cuda --out /dev/shm/syn --group-size 128 --samples 512 --seq 2048 > $R/synthetic.log 2>&1; echo "synthetic rc=$? at $(( $(date +%s) - t0 )) s"; tail -3 $R/synthetic.log
fi
