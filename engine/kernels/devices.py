"""The current CUDA device for launches that follow it (Triton kernels, CUDA graphs)."""

from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make the tensor's device the current one (a model on cuda:N, device_map); CPU: no-op."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
