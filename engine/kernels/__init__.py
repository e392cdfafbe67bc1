"""What runs the model's math: attention backends over the paged KV cache (PyTorch, Triton, C++),
the CPU and GGUF C++ kernels and their loader, fused Triton ops, projection fusion, CUDA graphs,
and the choice among them (static rules, then measured on the host by autotune)."""
