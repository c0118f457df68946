"""glmrel's extension of llm-compressor's AWQ for MoE calibration at GLM-4.7 size.

Targets llmcompressor 0.14.0.1 (`llmcompressor/modifiers/transform/awq/base.py`). The changes
to AWQ's own steps are overrides in `MoeAWQModifier` (modifier.py), a subclass of
`AWQModifier` that `oneshot` runs in its place (`Engine.recipe`); what a subclass cannot reach
(the library's cache update, the experts' forward, the calibration context, the offload write,
the all-reduce) `scaled_awq()` patches for one run through `hooks.Patches` and undoes when it
exits. `scaled_awq` refuses any other llm-compressor version rather than patching blind.
Modules: options (the knobs), state (what a run's patches share), stats (what it records),
caches, experts, merge, balance, ranks, causal, routing, kernels (the patches' pieces),
activations (AWQ's calibration hooks, their sums kept on the device), all_experts (on a GPU,
every expert on every token as batched products in the calibration pass, and the routed tokens
only in the propagation pass), modifier, engine, hooks, side (one calibration pass for
several group sizes: each layer smoothed once per side branch after the propagating branch's
own smoothing, from the layer's originals; its docstring says why that is sound) and grid (the
side branches' searches near the propagating branch's choices, `side_grid_window`).

What stock 0.14.0.1 does and what each change does, by the name comments use for it (and
the ScaleOptions field that turns it on):

1. **First output only** (`keep_first_output`). `_run_samples` builds a list of each batch's
   *whole* output before keeping element 0. Under the eager attention llm-compressor forces during
   calibration, the attention parent's output holds the [heads, seq, seq] attention weights: all N
   batches of them are alive at once (0.79 GiB per 2048-token sample at GLM-4.7 size). Patched:
   element 0 is kept as each batch finishes. Same values, bit for bit.
2. **Streamed loss** (`stream_loss`). The grid search keeps the quantized outputs of all N batches
   for each grid point, then computes the loss. Patched: the loss is accumulated batch by batch as
   the outputs are made, in the same order with the same arithmetic. Bit for bit.
3. **Routed experts in the search** (`routed_experts_in_search`). With `moe_calibrate_all_experts`,
   the MoE block's forward runs every expert on every token, and stays that way inside AWQ's grid
   search, although the block's output (what the loss compares) only uses each token's top-k
   experts. Patched: inside the smoothing step the block runs each expert on its routed tokens only
   — 160/8 = 20x fewer expert FLOPs for GLM-4.7. Calibration statistics (activation means, cached
   inputs) still see every token for every expert. The arithmetic differs only in GEMM row
   blocking, which can change the last bits of an expert's output; the AWQ scales and KL are
   compared with stock in tests.
4. **Sampled expert rows** (`max_expert_tokens`). For each expert's `up_proj -> down_proj` mapping,
   AWQ caches the `down_proj` input of every calibration token (160 x 2048 x 1536 bf16 per sample:
   ~1.1 GiB per sample, offloaded to host RAM), and its grid search runs 21 x N small forwards per
   expert, each an onload from host memory. Patched: at most `max_expert_tokens` rows per expert
   are kept, an evenly spread deterministic subset, as one batch (21 forwards per expert); the
   activation mean that shapes the candidate scales still comes from every token. `None` keeps
   every token in N batches (stock).
5. **Batched experts** (`batched_experts`). Inside the smoothing step, the MoE block's experts run
   as three batched matrix products (tokens grouped by expert, padded to the busiest expert of each
   run of consecutive experts; the runs sized so the padded temporaries stay within 4 GiB) instead
   of stock's Python loop over 160 experts with ~10 small kernels each. Expert weights are stacked
   once per grid point (they change only between grid points) with the same fake quantization the
   Linear's own forward would apply; each token's k weighted expert outputs are summed in fp32 and
   rounded once (the loop adds them into bf16 one expert at a time with atomic index_add_). The
   first call per layer is checked against the stock loop; a mismatch turns the batched path off
   for the rest of the run.
6. **SDPA in the search** (`sdpa_in_search`). Inside the smoothing step, attention runs through
   PyTorch's SDPA instead of the eager attention llm-compressor forces for calibration (eager
   materialises the [heads, seq, seq] scores in fp32: ~14 ms per 2048-token sample at GLM-4.7 size,
   22 times per sample for the attention mapping). The reference output and every grid point use
   the same kernel, so the loss compares like with like; the values differ from eager's in the last
   bits of bf16. The calibration forward itself (statistics, caches, what the next layer sees)
   stays eager.
7. **Merged batches** (`search_batch_tokens`). The reference forward and each grid point run the
   cached samples in merged batches of up to `search_batch_tokens` tokens instead of one forward
   per sample: token-wise parents (MLP, MoE block, Linear) concatenate along the token axis
   whatever the sample lengths; attention stacks samples of equal shape along the batch axis (only
   under SDPA in the search: stacked eager attention would hold N x [heads, seq, seq] fp32 scores).
   The loss is the same sum of squared errors over the same elements, grouped differently. Each
   expert's sampled `down_proj` rows (sampled expert rows) are moved to the GPU once per mapping,
   not once per grid point.
8. **Batched expert search** (`expert_search: sampled-batched`, and under the Gram search). The
   routed experts' `up_proj -> down_proj` searches of a layer run together: per grid point one
   scale computation, one min/max, one `calculate_qparams`, one `fake_quantize` and one batched
   matmul for a chunk of experts, instead of llm-compressor's per-mapping machinery (~5 ms of
   framework time per expert and grid point, measured on CPU). Quantization is disabled during
   AWQ's search, so Q(W*s)/s is the whole weight, as in stock. The loss is summed in fp32 per
   expert (stock rounds each batch's sum to bf16); smoothing is applied with stock's formulas.
9. **Resident caches** (`resident_cache_gib`). Where AWQ's cached parent inputs live. Stock
   offloads every cached input of a MoE model to host RAM, then for each mapping copies the
   parent's cache into pinned memory, which PyTorch's pinned allocator rounds up to a power of two
   (a 20 MiB sample takes a 32 MiB block) and keeps after the mapping, block sizes apart: the dense
   layer's 64 MiB blocks stayed reserved through every later layer. Patched: a parent's inputs stay
   on the GPU where they were computed (copied, so nothing the model does later can change them)
   while the run's `resident_cache_gib` lasts; the rest go to host RAM as in stock. A value equal
   to the same input of the previous sample (the causal mask and RoPE tables of equal-length
   samples) is stored once, in AWQ's caches and in the pipeline's. After each mapping the pinned
   blocks and freed host memory go back to the system. Same values, bit for bit.
10. **Gram search** (`expert_search: gram`, the default). A routed expert's `down_proj` is a Linear:
   its grid search loss is ||X (Wq - W)^T||^2 / (rows * out) over the cached inputs X, with Wq =
   Q(W*s)/s. That equals tr(D G D^T) / (rows * out) with D = Wq - W and G = X^T X. So instead of
   keeping rows (stock: every token; sampled expert rows: a sample), the calibration forward adds
   each batch's X^T X into one fp32 [in, in] matrix per expert (9 MiB at GLM-4.7 size, whatever the
   number of samples), and the batched expert search's batched search evaluates every grid point
   for a chunk of experts from G: one [E, out, in] x [E, in, in] product instead of replaying the
   rows. Every calibration token counts in every expert's search, memory does not grow with the
   samples, and the cost per grid point does not grow with the tokens. Under data parallelism G is
   all-reduced, so each rank searches its share of the experts and the chosen scales are
   all-reduced (one rank's value plus zeros: exact). The loss is exact in fp32 where stock's
   compares bf16 outputs (each batch's sum rounded to bf16), so near-tied grid points can resolve
   differently: measured in tests/test_awq_scale.py.
11. **Deferred write-back** (`deferred_write_back`). Where smoothed weights are written. The
   sequential pipeline keeps the layer being calibrated onloaded on the GPU (compressed-tensors'
   `disable_offloading`), and stock's `update_offload_parameter` writes every smoothed weight
   twice: into that GPU copy and, with a synchronous copy from the GPU into pageable memory, into
   the CPU offload (an expert's `up_proj` twice a layer, as a balance layer and as a smooth layer).
   Profiled at GLM-4.7 size this write-back was a third of the layer's AWQ time, paid whole by
   every data-parallel rank into the one shared CPU copy. Patched (`deferred_write_back`): inside
   AWQ's smoothing a write lands on the GPU copy only and the weight is marked; at the end of the
   layer's smoothing each marked weight is copied to its CPU offload once, through two pinned
   staging buffers (the copy from the GPU of one overlaps the host copy of the other), and under
   data parallelism each rank copies its share of the layers' weights into the shared CPU memory,
   then waits for the others. Until then nothing reads the CPU copies: the layer stays onloaded
   through its smoothing and the propagation pass. Same values, bit for bit. Weights offloaded
   to disk (`offload.cpu_gib`) are deferred the same way and their files written at the end of
   the layer; under data parallelism each by one rank (stock: every rank rewrote every smoothed
   weight's file, N copies of the layer's experts per node).
12. **Batched balance layers** (`batched_balance_layers`). At each grid point stock quantizes the
   mapping's balance layers one by one: for each Linear a scaled copy, an observer pass (min/max),
   `update_qparams` and `forward_quantize`, ~30 small kernels and their framework calls. The MoE
   block's mapping has 322 balance layers at GLM-4.7 size (160 experts' gate and up projections and
   the shared expert's), so that loop ran ~6,800 times per layer, on every data-parallel rank
   alike. Patched (`batched_balance_layers`): stock's grid search for the mapping, with the balance
   layers of one shape and quantization scheme scaled, observed (min/max), given quantization
   parameters and fake-quantized together, in chunks of layers whose temporaries stay within 2 GiB;
   each layer's weight (and its onloaded scale and zero point, as stock's
   `update_qparams(only_update_onload=True)` sets them) becomes a new tensor of its own, as in
   stock. Rows are quantized independently (channel and group strategies only; any other scheme
   keeps stock's loop) and each product and quotient is rounded to the weight's dtype once, as in
   stock, so the values are the same, bit for bit (tests/test_awq_scale.py; equal weight digests at
   GLM-4.7 size on an H200).
13. **Fused experts** (`fused_gpu_experts`, on a GPU) **and batched hooks** (`batched_expert_hooks`).
   The calibration forward runs every expert on every token as batched products, and the hooks
   glmrel registers on the experts (AWQ's sums, the Gram matrices, the coverage counts) once per
   chunk of experts; down_proj then runs on the routed rows only, since no hook reads its output.
   The routed sum keeps the loop's order (same bits); the batched sums may round a last bit
   otherwise (all_experts.py; measured at GLM-4.7 size: the same KL). With `gram_by_gemm` (off
   by default) the GEMM adds each sample's Gram matrices into their sums (caches.py).
14. **Read ahead** (`read_ahead`) **and onload ahead** (`onload_ahead`). With the base weights
   offloaded to disk, the next decoder layer's byte ranges are asked into the page cache while a
   layer is smoothed: a hint. Once a layer is smoothed, a helper thread onloads the next layer's
   offloaded weights onto the GPU (read as compressed-tensors' own onload reads them, copied
   through two pinned staging buffers on a stream of its own: `onload_ahead_pinned`) while the
   layer's outputs propagate, and the next calibration pass is handed each copy instead of
   waiting on the upload; a copy whose source changed since is dropped (read_ahead.py). The same
   weights.
15. **Causal attention in the search** (`causal_search_attention`, on a GPU). A cached attention
   mask that is exactly the causal pattern (what eager attention's pipeline caches) is left out
   of the search's SDPA forwards, so SDPA runs its causal GQA kernel instead of adding the mask
   to every score with the key/value heads repeated (causal.py). The last bits of attention's
   output may differ; the reference and every grid point take the same path. With
   `causal_calibration_attention` (off by default: it changes the last bits of what the
   statistics and the next layer see, and has not run on a GPU) the calibration and propagation
   passes' eager attention does the same.
16. **Routing reuse** (`reuse_routing`). Inside a MoE block's search the router's outputs of the
   reference forward answer the grid points' calls in the same order (routing.py): its weight
   has no scheme the search quantizes and its input is the cached one. Same bits; the first
   reuse of each mapping is recomputed and compared.
17. **Triton kernels** (`triton_kernels`, on a GPU). The routed rows' weighted sum (with the
   gather back to token order and the fp32 sum) and the experts' SiLU gate as single kernels
   (kernels.py), each checked against torch's ops on the device before use; the gate may differ
   from torch's in the last bit of a few elements. With `fused_rope` (on by default) GLM's
   rotary embedding of q and k runs as one kernel each instead of about ten
   passes of torch's ops (rope.py), in every pass, where it gave transformers' bits on the
   device: the same values.
"""

from .engine import Engine, scaled_awq
from .hooks import HOOKS, Patches
from .options import EXPERT_SEARCHES, TARGET_VERSION, ScaleOptions
from .side import QUANTIZATION_FILE, SideBranch
from .stats import LayerRecord, ScaleStats, release_host_memory

__all__ = [
    "EXPERT_SEARCHES",
    "Engine",
    "HOOKS",
    "Patches",
    "QUANTIZATION_FILE",
    "TARGET_VERSION",
    "LayerRecord",
    "ScaleOptions",
    "ScaleStats",
    "SideBranch",
    "release_host_memory",
    "scaled_awq",
]
