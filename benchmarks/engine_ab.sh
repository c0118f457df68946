#!/usr/bin/env bash
# An A/B of the AWQ engine on one GPU: variants of the engine's options (or another tree of
# glmrel) timed on one synthetic GLM-4.7-dims model by benchmarks.profile_layer, one after the
# other on one machine, and each variant's chosen scales compared with the first's.
#
#   VARIANTS="default sync_free_routing=true default sync_free_routing=true" \
#     N=512 LAYERS=2 DENSE=0 bash benchmarks/engine_ab.sh OUT_DIR
#
# A variant is `default` (this tree as it is), KEY=VALUE[,KEY=VALUE...] (engine options,
# profile_layer --engine; e.g. onload_ahead=[]), or tree:PATH (the glmrel tree at PATH, e.g. a
# `git archive` of a base commit unpacked there). A variant named twice is timed twice: the
# second run's figures say how noisy the first's are. LIMIT (seconds) stops starting a run that
# could not finish; the model is made once in SYN (default /dev/shm/syn) and reused. A run's files
# are named NN-<variant>, its `=` written `-`. BASE_SCALES (a run's NN-<variant>-scales.pt from an
# earlier call on the same model, e.g. while the machine is still warm) is compared with every
# run's scales too, into NN-<variant>-vs-base.txt.
# Where python3 lacks llm-compressor and wheels are in .whl (carried to a GPU machine), they are
# installed first. Prints each run's passes and layers, and the scales' agreement; writes each
# run's record to OUT_DIR. Asserts nothing.
set -u
out=${1:?usage: engine_ab.sh OUT_DIR}
mkdir -p "$out"
t0=$(date +%s)
left() { echo $(( ${LIMIT:-560} - ($(date +%s) - t0) )); }
here=$PWD
if ! python3 -c "import llmcompressor" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  site=/tmp/site:
else
  site=
fi
# The caller's PYTHONPATH (where it already holds llm-compressor, say) is kept, after this tree's.
rest=${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONPATH=$site$here$rest
syn=${SYN:-/dev/shm/syn}
n=${N:-512}
# The code that ran, by content: a copy of a working tree may carry an older .git (session 37's
# device copy named a commit four behind its files), so HEAD alone does not say what ran.
# `find release benchmarks -name '*.py' | LC_ALL=C sort | xargs sha256sum | sha256sum` in a checkout gives
# the same digest for the same files.
(echo "HEAD $(git rev-parse --short HEAD 2>/dev/null), $(git status --porcelain 2>/dev/null | wc -l) paths differ from it"
 echo "code $(find release benchmarks -name '*.py' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
 date; nvidia-smi 2>/dev/null | head -12) > "$out/machine.txt"
if [ ! -f "$syn/release.yaml" ]; then
  python3 -m benchmarks.synthetic --preset "${PRESET:-glm47}" --layers "${LAYERS:-2}" --dense "${DENSE:-0}" \
    --device "${DEVICE:-cuda}" --out "$syn" --group-size 128 --samples "$n" --seq "${SEQ:-2048}" > "$out/synthetic.log" 2>&1 \
    || { echo "the synthetic model failed:"; tail -5 "$out/synthetic.log"; exit 1; }
fi
echo "model ready at $(( $(date +%s) - t0 )) s"
i=0
first=
for v in ${VARIANTS:-default}; do
  i=$((i + 1))
  [ "$(left)" -lt "${MIN_RUN_S:-120}" ] && { echo "no time left for run $i ($v)"; break; }
  tree=$here; args=()
  case $v in
    default) ;;
    tree:*) tree=${v#tree:} ;;
    *) IFS=, read -ra sets <<< "$v"; for s in "${sets[@]}"; do args+=(--engine "$s"); done ;;
  esac
  # `=` becomes `-`: the device tool brings back no file whose name holds one (session 40 lost a run's record so)
  name=$(printf '%02d-%s' $i "$(printf '%s' "$v" | tr '=' '-' | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-40)")
  (cd "$tree" && PYTHONPATH=$site$tree$rest timeout "$(left)" python3 -m benchmarks.profile_layer --config "$syn/release.yaml" \
    --samples "$n" --profile-samples 0 "${args[@]}" --scales "$out/$name-scales.pt" --json "$out/$name.json") > "$out/$name.log" 2>&1
  echo "run $i ($v): exit $? at $(( $(date +%s) - t0 )) s"
  [ -z "$first" ] && first=$name
  if [ -f "$out/$first-scales.pt" ] && [ -f "$out/$name-scales.pt" ] && [ "$name" != "$first" ]; then
    python3 -m benchmarks.profile_layer --compare "$out/$first-scales.pt" "$out/$name-scales.pt" > "$out/$name-vs-first.txt" 2>&1
  fi
  if [ -n "${BASE_SCALES:-}" ] && [ -f "$out/$name-scales.pt" ]; then
    python3 -m benchmarks.profile_layer --compare "$BASE_SCALES" "$out/$name-scales.pt" > "$out/$name-vs-base.txt" 2>&1
  fi
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
for f in sorted(glob.glob(os.path.join(out, "[0-9][0-9]-*.json"))):
    timed = json.load(open(f)).get("timed", {})
    passes = {p["pass"]: p["s"] for p in timed.get("passes", [])}
    layers = [(row["calib_s"], row["smooth_s"]) for row in timed.get("layers", [])]
    print(os.path.basename(f)[:-5], "oneshot", timed.get("oneshot_s"), "layers (calib, smooth)", layers)
    print("   passes", passes)
    for against in ("first", "base"):
        cmp = f[:-5] + f"-vs-{against}.txt"
        if os.path.exists(cmp):
            try:
                kinds = json.load(open(cmp))
                print(f"   scales vs {against}:", {k: f"{v['equal']}/{v['mappings']} equal" for k, v in kinds.items()})
            except ValueError:
                print(f"   scales vs {against}: unreadable", open(cmp).read()[-300:])
PY
