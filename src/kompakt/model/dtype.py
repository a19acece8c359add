"""Compute dtype follows the hardware; the storage dtype is remembered so savers keep it.

CPUs without native bf16 instructions emulate bf16/fp16 matmuls slowly and less exactly,
so half-precision checkpoints are computed in fp32 there. CPUs with AVX512-BF16 or AMX
compute bf16 checkpoints in bf16. GPUs compute in bf16 (fp16 where bf16 is missing).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 flags in /proc/cpuinfo; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in _BF16_CPU_FLAGS)
    return False


def compute_dtype_for(storage_dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype to run a model stored in `storage_dtype` on `device`.

    CPU: fp32, except bf16 checkpoints on CPUs with native bf16. CUDA: bf16 (fp16 on GPUs
    without bf16). MPS: fp16 for half-precision checkpoints, else fp32.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16 if storage_dtype in (torch.float16, torch.bfloat16) else torch.float32
    if storage_dtype == torch.bfloat16 and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from "bf16" / "float32" / torch.float16 (None stays None, "auto" too)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _NAMES:
        from kompakt.errors import ConfigError

        raise ConfigError(f"unknown dtype {value!r}; use one of fp32, fp16, bf16")
    return _NAMES[key]


def storage_dtype_of_config(config: dict) -> torch.dtype:
    """The dtype recorded in a config.json dict ("dtype" or the older "torch_dtype"); fp32 if none."""
    for source in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = source.get(key)
            if isinstance(value, str) and value.lower().removeprefix("torch.") in _NAMES:
                return _NAMES[value.lower().removeprefix("torch.")]
    return torch.float32
