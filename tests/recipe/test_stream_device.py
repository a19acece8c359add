"""`--device`: a streamed model's layers are onloaded to the chosen device one at a time.

On the CPU (every machine): the choice is checked in one line before anything is opened, and a
model opened lazily under it records where its layers go and in which dtype. On a CUDA GPU (the
accelerator machine; skipped elsewhere): every streamable pass gives, in fp32 on the GPU, the
CPU's result up to float rounding, and in the GPU's default bf16 a model no further from the
CPU's result than that result is from the original.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from recipe_helpers import stored_tensors

from kompakt.model.device import check_device, default_device, use_device
from kompakt.model.lazy import open_lazy
from kompakt.model.load import load
from kompakt.model.tiny import save_tiny
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.recipe.stream_step import streamed_step

STREAMED = {
    "rtn": ("quant.rtn", {"bits": 4, "group_size": 32}),
    "gptq": ("quant.gptq", {"bits": 4, "group_size": 32}),
    "awq": ("quant.awq", {"bits": 4, "group_size": 32}),
    "gptq-awq": ("quant.gptq", {"bits": 4, "group_size": 32, "awq": True}),
    "wanda": ("prune.sparse", {"method": "wanda", "sparsity": 0.5}),
    "sparsegpt": ("prune.sparse", {"method": "sparsegpt", "nm": "2:4"}),
}
def needs_cuda(test):
    """Marked `cuda` (the suite leaves its device alone) and skipped without a CUDA GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def test_device_choice_is_checked_in_one_line(tiny_dir, text_file, tmp_path, cli):
    before = default_device()
    assert check_device("cpu") == "cpu" and check_device(None) == check_device("auto")
    for bad, message in [("tpu", "unknown --device 'tpu'"), ("cuda:99", "cuda")]:
        if bad.startswith("cuda") and torch.cuda.device_count() > 99:
            continue
        code, _, err = cli(["compress", str(tiny_dir), "--data", str(text_file), "--out", str(tmp_path / "run"),
                            "--step", "quant.rtn", "--device", bad])  # fmt: skip
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()
    for command in (["eval", str(tiny_dir)], ["analyze", str(tiny_dir), "--out", str(tmp_path / "analysis")]):
        code, _, err = cli([*command, "--device", "tpu"])
        assert code == 2 and err.strip() == "error: unknown --device 'tpu'; use auto, cpu, cuda, cuda:N or mps", err
    assert default_device() == before  # each command's choice ended with it


def test_lazy_model_records_the_chosen_device(tmp_path):
    save_tiny("llama", tmp_path / "m")
    with use_device("cpu"):
        assert default_device() == "cpu"
        lazy = open_lazy(tmp_path / "m")
    assert lazy.device == torch.device("cpu") and lazy.compute_dtype == torch.float32  # the in-memory CPU dtype


def _blocks() -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def _streamed(source: Path, out: Path, key: str, device: str, dtype: torch.dtype | None = None) -> None:
    name, values = STREAMED[key]
    spec = get_pass(name)
    with use_device(device):
        lazy = open_lazy(source)
    assert lazy.device.type == torch.device(device).type
    if dtype is not None:
        lazy.compute_dtype = dtype
    blocks = _blocks()
    streamed_step(spec, build_config(spec, values), lazy, out,
                  lambda loaded, stream: PassContext(loaded=loaded, original=lambda: loaded,
                                                     calibration=lambda: blocks, stream=stream))  # fmt: skip
    assert lazy.live_numel == 0  # every layer went back to meta


def _logits(directory: Path) -> torch.Tensor:
    model = load(directory, device="cpu", dtype="float32").model
    with torch.no_grad():
        return model(_blocks()[:2]).logits


@needs_cuda
@pytest.mark.parametrize("key", list(STREAMED))
def test_gpu_fp32_equals_cpu_up_to_rounding(tmp_path, key):
    save_tiny("llama", tmp_path / "src")
    _streamed(tmp_path / "src", tmp_path / "cpu", key, "cpu")
    _streamed(tmp_path / "src", tmp_path / "gpu", key, "cuda", torch.float32)
    cpu, gpu = stored_tensors(tmp_path / "cpu"), stored_tensors(tmp_path / "gpu")
    assert sorted(cpu) == sorted(gpu)
    for name in cpu:
        a, b = cpu[name], gpu[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        same = torch.isclose(a.double(), b.double(), rtol=1e-3, atol=1e-4).float().mean().item()
        assert same >= 0.97, f"{name}: {same:.3f} of the values agree"


@needs_cuda
@pytest.mark.parametrize("key", ["gptq", "sparsegpt"])
def test_gpu_bf16_is_as_close_to_the_cpu_result_as_that_is_to_the_original(tmp_path, key):
    save_tiny("llama", tmp_path / "src")
    _streamed(tmp_path / "src", tmp_path / "cpu", key, "cpu")
    _streamed(tmp_path / "src", tmp_path / "gpu", key, "cuda")  # the GPU's compute dtype (bf16)
    original, cpu, gpu = (_logits(tmp_path / d) for d in ("src", "cpu", "gpu"))
    assert (gpu - cpu).norm() <= (cpu - original).norm()

