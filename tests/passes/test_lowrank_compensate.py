"""lowrank.compensate on a tiny llama: the adapter lowers the KL to the original left by the
quantization (uniform and global rank), leaves the quantized weights on their grid, is a PEFT
adapter PEFT loads to the same logits, survives save -> kompakt.load; bad inputs are refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kompakt.errors import ConfigError, ModelFormatError
from kompakt.model.compression import get_state
from kompakt.model.load import load
from kompakt.model.lora_adapter import ADAPTER_DIR, attached, detach
from kompakt.model.loaded import LoadedModel
from kompakt.model.save import save_model
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.train.data import TrainData

COMPENSATE = get_pass("lowrank.compensate")
_GEN = torch.Generator().manual_seed(5)
_VOCAB = torch.randint(0, 256, (24,), generator=_GEN)  # correlated, text-like token streams
CALIB = _VOCAB[torch.randint(0, 24, (16, 64), generator=_GEN)]
HELDOUT = _VOCAB[torch.randint(0, 24, (4, 64), generator=_GEN)]

pytestmark = pytest.mark.usefixtures("one_thread")


TRAIN = TrainData.plain(_VOCAB[torch.randint(0, 24, (16384,), generator=_GEN)], "text-like tokens")


def _run(spec_name: str, loaded: LoadedModel, original: LoadedModel, **values):
    spec = get_pass(spec_name)
    ctx = PassContext(loaded=loaded, original=lambda: original, calibration=lambda: CALIB, seed=0,
                      teacher=lambda path: original, training=lambda *args: TRAIN)  # fmt: skip
    return spec.apply(ctx, build_config(spec, values))


def _copy(loaded: LoadedModel) -> LoadedModel:
    return LoadedModel(model=copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, name=loaded.name)


def _logits(model, ids=HELDOUT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _kl(reference: torch.Tensor, model) -> float:
    return float(F.kl_div(F.log_softmax(_logits(model), -1), F.log_softmax(reference, -1), log_target=True,
                          reduction="sum") / HELDOUT.numel())  # fmt: skip


@pytest.fixture(scope="module")
def quantized():
    """(original, a 3-bit RTN copy of it): a large, correctable error."""
    original = tiny_model("llama")
    student = _copy(original)
    _run("quant.rtn", student, original, bits=3, group_size=32)
    return original, student


def test_compensation_lowers_kl_and_keeps_the_grid(quantized):
    original, student = quantized
    reference = _logits(original.model)
    before = _kl(reference, student.model)
    weights = {n: p.clone() for n, p in student.model.state_dict().items()}
    kls = {}
    for allocation in ("uniform", "global"):
        loaded = _copy(student)
        report = _run("lowrank.compensate", loaded, original, rank=4, allocation=allocation)
        kls[allocation] = _kl(reference, loaded.model)
        assert report.details["error_removed"] > 0.2, report.details
        assert all(torch.equal(weights[n], p) for n, p in loaded.model.state_dict().items())  # base untouched
    assert kls["uniform"] < 0.8 * before, (before, kls)
    assert kls["global"] < 0.8 * before, (before, kls)


def test_tuning_the_factors_lowers_the_kl_further_and_touches_nothing_else(quantized):
    """tune_tokens distils B and A alone from the reference after the closed form: the held-out KL
    falls below the closed form's, the quantized weights stay on their grid and the factors are the
    adapter's buffers again afterwards (not parameters: saving and export see the plain model)."""
    original, student = quantized
    reference = _logits(original.model)
    closed = _copy(student)
    _run("lowrank.compensate", closed, original, rank=2)
    tuned = _copy(student)
    names = [n for n, _ in tuned.model.named_parameters()]
    weights = {n: p.clone() for n, p in tuned.model.state_dict().items()}
    report = _run("lowrank.compensate", tuned, original, rank=2, tune_tokens=16384, tune_lr=3e-3)
    assert report.details["tuned"]["tokens"] == 16384 and "distilled" in report.summary
    assert _kl(reference, tuned.model) < 0.9 * _kl(reference, closed.model)
    assert [n for n, _ in tuned.model.named_parameters()] == names
    assert all(torch.equal(weights[n], p) for n, p in tuned.model.state_dict().items())
    assert all(p.requires_grad for p in tuned.model.parameters())  # as trainable as before
    learned, closed_form = attached(tuned.model), attached(closed.model)
    for name, (b, a) in learned.items():
        assert not isinstance(b, torch.nn.Parameter) and not isinstance(a, torch.nn.Parameter)
    assert any(not torch.equal(learned[n][0], closed_form[n][0]) for n in learned)
    with pytest.raises(ConfigError, match="tune_tokens"):
        build_config(COMPENSATE, {"tune_tokens": -1})


def test_awq_scaled_models_are_compensated_in_their_own_coordinates():
    """After quant.awq the quantized Linears read rescaled inputs and v_proj / up_proj write rescaled
    outputs: the reference is taken in those coordinates (tests/ops/test_error_compensation.py), so
    the adapter lowers the KL instead of undoing AWQ's scales (which raised SmolLM2's KL from 0.04
    to 1.36 before the output side was handled; 0.038 -> 0.033 after, 4 layers)."""
    original = tiny_model("llama")
    student = _copy(original)
    _run("quant.awq", student, original, bits=3, group_size=32)
    _run("quant.rtn", student, original, bits=3, group_size=32)
    reference = _logits(original.model)
    before = _kl(reference, student.model)
    _run("lowrank.compensate", student, original, rank=4)
    assert _kl(reference, student.model) < 0.8 * before


def test_adapter_round_trips_through_peft_and_kompakt_load(quantized, tmp_path):
    from peft import PeftModel

    original, student = quantized
    loaded = _copy(student)
    _run("lowrank.compensate", loaded, original, rank=4, allocation="global")
    expected = _logits(loaded.model)
    save_model(loaded, tmp_path / "step")
    assert (tmp_path / "step" / ADAPTER_DIR / "adapter_config.json").exists()
    reloaded = load(tmp_path / "step", device="cpu", dtype="float32")
    assert get_state(reloaded).adapter is not None and attached(reloaded.model)
    torch.testing.assert_close(_logits(reloaded.model), expected, rtol=1e-4, atol=1e-4)

    base = load(tmp_path / "step", device="cpu", dtype="float32").model
    detach(base)  # the plain quantized model, as any PEFT user would load it
    torch.testing.assert_close(_logits(base), _logits(student.model), rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "step" / ADAPTER_DIR))
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused(quantized, tmp_path):
    original, student = quantized
    with pytest.raises(ConfigError, match="not quantized"):
        _run("lowrank.compensate", _copy(original), original)
    with pytest.raises(ConfigError, match="quantized model itself"):
        same = _copy(student)
        _run("lowrank.compensate", same, same)
    with pytest.raises(ConfigError, match="same weights"):  # e.g. the recipe started from a quantized model
        _run("lowrank.compensate", _copy(student), _copy(student))
    shallow = _copy(original)
    del shallow.model.model.layers[-1]
    with pytest.raises(ConfigError, match="layers"):
        _run("lowrank.compensate", _copy(student), shallow)
    for values in ({"rank": 0}, {"allocation": "greedy"}):
        with pytest.raises(ConfigError):
            build_config(COMPENSATE, values)
    # an adapter directory that went missing: one-line error on load, not a silently different model
    loaded = _copy(student)
    _run("lowrank.compensate", loaded, original, rank=2)
    save_model(loaded, tmp_path / "step")
    (tmp_path / "step" / ADAPTER_DIR / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="cannot read the LoRA adapter"):
        load(tmp_path / "step", device="cpu")


def _gguf_student(original: LoadedModel, tmp_path, monkeypatch, steps: list[tuple[str, dict]]) -> LoadedModel:
    """`original` after `steps`, written as a q4_0 GGUF and read back by kompakt.load: no quantization
    recorded, the file's dequantized weights."""
    from kompakt.export import export_gguf

    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    student = _copy(original)
    student.name = "tiny"
    for name, values in steps:
        _run(name, student, original, **values)
    loaded = load(export_gguf(student, tmp_path / "student.gguf", type="q4_0"), device="cpu", dtype="float32")
    assert get_state(loaded).quantization is None
    return loaded


@pytest.mark.parametrize("awq", [False, True], ids=["plain", "awq"])
def test_a_quantized_gguf_is_compensated_in_its_own_coordinates(tmp_path, monkeypatch, awq):
    """Any tool's quantized .gguf: every decoder Linear is a target, and the file is taken as
    rescaled exactly when its norms differ from the reference's (AWQ folds its scales there); the
    adapter's gguf-lora passes the name and shape check against that same file."""
    from kompakt.export.api import export
    from kompakt.passes import lowrank_compensate

    original = tiny_model("llama")
    steps = [("quant.awq", {"format": "q4_0"})] if awq else []
    gguf_model = _gguf_student(original, tmp_path, monkeypatch, steps)
    assert lowrank_compensate._norms_differ(gguf_model.model, original.model) == awq
    reference = _logits(original.model)
    before = _kl(reference, gguf_model.model)
    report = _run("lowrank.compensate", gguf_model, original, rank=8)
    assert report.details["modules"] == 4 * 7  # every decoder Linear of the 4 layers
    assert _kl(reference, gguf_model.model) < 0.8 * before
    adapter = export(gguf_model, format="gguf-lora", out=tmp_path / "adapter.gguf", base=tmp_path / "student.gguf")
    assert adapter.path.is_file()


def test_a_float_model_that_is_no_gguf_is_still_refused(tmp_path, monkeypatch):
    original = tiny_model("llama")
    saved = _copy(original)
    save_model(saved, tmp_path / "plain")
    with pytest.raises(ConfigError, match="not quantized; .* or run it on a quantized .gguf"):
        _run("lowrank.compensate", load(tmp_path / "plain", device="cpu", dtype="float32"), original)
