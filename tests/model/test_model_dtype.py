"""Compute dtype follows the hardware; dtype names parse."""

from __future__ import annotations

import pytest
import torch

import kompakt.model.dtype as dtype_module
from kompakt.errors import ConfigError
from kompakt.model.dtype import compute_dtype_for, parse_dtype, storage_dtype_of_config


@pytest.mark.parametrize("native", [False, True])
def test_cpu_compute_dtype(monkeypatch, native):
    monkeypatch.setattr(dtype_module, "cpu_has_native_bf16", lambda: native)
    assert compute_dtype_for(torch.float32, "cpu") == torch.float32
    assert compute_dtype_for(torch.float16, "cpu") == torch.float32
    assert compute_dtype_for(torch.bfloat16, "cpu") == (torch.bfloat16 if native else torch.float32)


def test_cuda_compute_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype_for(torch.float32, "cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert compute_dtype_for(torch.bfloat16, "cuda") == torch.float16


def test_parse_dtype():
    assert parse_dtype("bf16") == parse_dtype("torch.bfloat16") == torch.bfloat16
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    assert parse_dtype(torch.float16) == torch.float16
    with pytest.raises(ConfigError):
        parse_dtype("int3")


def test_storage_dtype_of_config():
    assert storage_dtype_of_config({"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert storage_dtype_of_config({"text_config": {"dtype": "float16"}}) == torch.float16
    assert storage_dtype_of_config({}) == torch.float32


def test_cpuinfo_probe_returns_a_bool():
    assert isinstance(dtype_module.cpu_has_native_bf16(), bool)
