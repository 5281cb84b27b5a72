"""Where the model runs: device choice, mixed-precision dtype and memory layout.

The precision rule, for training, validation and detection alike: with mixed precision on
(``amp``), CUDA runs bf16 where the card has it, else fp16 (with loss scaling in training);
a CPU runs bf16 where its processor computes bf16 natively (AVX512-BF16 or AMX on x86, the
BF16 extension on Arm), and float32 elsewhere. Weights, optimiser state, the loss and
checkpoints stay float32 throughout: autocast only changes the dtype convolutions and
matrix products compute in.
"""

from __future__ import annotations

import functools
import platform
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

Precision = Literal["bf16", "fp16", "fp32"]
# torch.cpu's checks of the x86 instructions that compute bf16 (each absent from some older releases).
_X86_NATIVE_BF16 = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA GPU is available")
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this processor computes bf16 in hardware, so that bf16 convolutions beat float32 ones.

    oneDNN's own check (``_is_mkldnn_bf16_supported``) is true on every AVX-512 processor, where it
    emulates bf16 at a fraction of float32's speed; on x86 the instructions that make it fast are
    AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids and later).
    """
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return any(getattr(torch.cpu, check, lambda: False)() for check in _X86_NATIVE_BF16)
    return True  # Arm: oneDNN's check already asks for the BF16 extension


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed-precision dtype on ``device`` (see the module docstring); None runs in float32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> Precision:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for an ``amp_dtype`` result."""
    names: dict[torch.dtype | None, Precision] = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, "fp32")


def memory_format(device: torch.device, dtype: torch.dtype | None = None) -> torch.memory_format:
    """channels_last on CUDA (the tensor cores want NHWC) and for CPU bf16 (oneDNN's AMX and AVX512-BF16
    kernels do too); float32 on a CPU stays NCHW, which trains faster there."""
    if device.type == "cuda" or dtype is not None:
        return torch.channels_last
    return torch.contiguous_format


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed precision in ``dtype`` on ``device``; no change when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
