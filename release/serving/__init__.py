"""Serving with vLLM: `rules` replays the pinned vLLM's kernel-selection rules for a branch
(light: `check` and `render` use it), `external` runs a branch through a real vLLM in its own
environment (`run` is the script that environment executes, standalone), and `cpu_patches`
fixes vLLM's CPU build for the demo.

May import: the shared modules (architecture, config, errors, manifest, build_log) and, for
`external`, release.verify (the held-out texts). `run.py` imports nothing of glmrel: it runs in
vLLM's Python.
"""
