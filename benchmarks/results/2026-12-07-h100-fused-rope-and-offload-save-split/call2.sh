# Session 40, call 2: the engine with and without fused_rope on call 1's model, 512 x 2048.
VARIANTS="${VARIANTS:-default fused_rope=true}" N=512 LIMIT=${LIMIT:-575} bash benchmarks/engine_ab.sh $OUT/ab
