"""Task recovery (`glmrel eval`): lm-evaluation-harness through vLLM on the base model and each
branch. `harness` runs lm-eval in vLLM's own environment (`lm_eval_run.py` is the script that
environment executes, standalone), `records` owns eval.json and its binding to a branch's
content, `cards` what the cards and the Hub's evaluation metadata make of it, `demo_tasks`
the demo's task data.

May import: the shared modules (config, errors, manifest, build_log) and release.serving
(the vLLM environment). `lm_eval_run.py` imports nothing of glmrel: it runs in vLLM's Python.
"""
