"""glmrel's benchmarks: each prints figures; none asserts a speed."""

from pathlib import Path as _Path

# GLM-4.7's own config.json (zai-org/GLM-4.7), shipped: the benchmarks' GLM-4.7 shapes come from it
GLM47_CONFIG = _Path(__file__).resolve().parent.parent / "configs" / "glm-4.7-config.json"
