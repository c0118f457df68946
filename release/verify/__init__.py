"""Verifying a branch against its base model: `branch` measures KL, top-1 agreement and
perplexity on held-out texts (in memory, or layer by layer with `stream` for models larger than
memory) and writes verify.json, bound to the branch's content.

May import: the shared modules (config, errors, architecture, layout, manifest, build_log).
Never the build, serving or publish.
"""
