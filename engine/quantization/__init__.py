"""Quantized weights and the layers that serve them: fp8 (on the fly or from fp8 checkpoints) and
a GGUF source's own Q4_1/Q8_0 blocks."""
