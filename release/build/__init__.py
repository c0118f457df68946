"""Building a branch: from the base model and the release config to a sealed branch folder.

`quantize` is the one dispatcher (a branch alone, several in one calibration pass, a branch on N
GPUs); `branch_folder` owns a folder's life (fingerprints, up to date, partial folders, sealing);
`calibrate` loads the model and runs llm-compressor's `oneshot` with glmrel's AWQ engine
(release.awq) and saves; `one_pass` makes side branches from a pass's stores; `calibration`
builds the calibration set; `coverage` counts the tokens each expert saw; `recipe` renders the
recipe; `room` refuses a build that cannot fit; `distributed` and `worker` run ranks under
torchrun; `compat` holds a fix of compressed-tensors; `pipeline` is `build-all` (quantize,
verify, manifest, check).

May import: the shared modules (config, errors, architecture, layout, manifest, owned,
build_log, console), release.awq, and, for `pipeline` only, release.verify and release.check.
Nothing outside this folder imports it but the CLI, the benchmarks and the tests.
"""
