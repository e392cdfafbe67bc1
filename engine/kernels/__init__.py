"""What runs the model's math: attention backends over the paged KV cache (PyTorch, Triton, C++),
the CPU and GGUF C++ kernels and their loader, fused Triton ops, projection fusion, CUDA graphs,
the choice among them (selection.py: static rules, then measured on the host by autotune.py), and
putting the chosen ones into the model (patching.py)."""
