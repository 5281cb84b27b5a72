"""Where the model runs: device choice, mixed-precision dtype and memory layout."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA GPU is available")
    return torch.device(name)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA, where the tensor cores want NHWC; CPU convolutions stay NCHW."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU has it (no loss scaling needed), else fp16; None on CPU or when off."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed precision in ``dtype`` on ``device``; no change when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
