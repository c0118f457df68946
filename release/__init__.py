"""glmrel: build, verify, describe and publish quantized MoE releases for vLLM."""

__version__ = "0.1.0"
