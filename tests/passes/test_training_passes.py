"""distill.kd, quant.qat and finetune.lora: the budget is what was asked, the hidden-state KD term
and QAT's frozen grid work on the plain and the multimodal layout, and relative quality:
distillation lowers KL to the teacher, QAT beats the RTN it starts from, the merged LoRA model
gives the adapter model's outputs. (Every family, save -> reload: tests/passes/test_pass_contract.py.)"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from kompakt.evaluate import fidelity
from kompakt.model.compression import get_state
from kompakt.model.load import load
from kompakt.model.loaded import LoadedModel
from kompakt.model.save import save_model
from kompakt.model.tiny import tiny_model
from kompakt.ops.quant import QuantGrid
from kompakt.passes.base import PassContext, build_config, get_pass, registry

IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
FAST = {"steps": 2, "seq_len": 32, "batch_size": 2, "checkpoint_every": 0}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    words = "the a model layer small token weight data run step of to and in is it that text".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(800)]
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _copy(loaded: LoadedModel) -> LoadedModel:
    return LoadedModel(model=copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, name=loaded.name)


def _apply(name, student, teacher, work=None, **values):
    spec = get_pass(name)
    ctx = PassContext(loaded=student, original=lambda: teacher, calibration=lambda: None, seed=0, work_dir=work)
    return spec.apply(ctx, build_config(spec, values))


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name, values", [
    ("distill.kd", {"hidden_weight": 0.5}),
    ("quant.qat", {"bits": 4, "group_size": 32}),
    ("finetune.lora", {"r": 4}),
])  # fmt: skip
def test_budget_and_what_each_training_pass_leaves(family, name, values, text, tmp_path):
    teacher = tiny_model(family)
    # distillation starts from another model: a copy of the teacher would give the hidden-state term nothing to do
    student = tiny_model(family, seed=1) if name == "distill.kd" else _copy(teacher)
    student_start = _copy(student)
    before = _logits(student)
    report = _apply(name, student, teacher, work=tmp_path / "work", data=str(text), lr=1e-2, **FAST, **values)
    assert report.details["steps"] == 2 and report.details["tokens"] == 2 * 2 * 32
    logits = _logits(report.loaded)
    assert torch.isfinite(logits).all() and not torch.equal(logits, before)
    if name == "distill.kd":  # the hidden-state term is on: without it, another student of the same start
        plain = _apply(name, _copy(student_start), teacher, data=str(text), lr=1e-2, **FAST, **{**values, "hidden_weight": 0.0})
        assert not torch.equal(_logits(plain.loaded), logits)
    if name == "quant.qat":  # frozen on the grid, and still there after a dense save -> reload
        reloaded = load(save_model(report.loaded, tmp_path / "saved"))
        meta = get_state(reloaded).quantization
        assert meta.method == "qat" and meta.bits == 4
        modules = dict(reloaded.model.named_modules())
        grid = QuantGrid(4, 32, True, scale_dtype=torch.float16)
        for module in meta.modules:
            w = modules[module].weight.detach()
            assert torch.equal(grid.fake_quantize(w), w), module  # frozen on the grid


@pytest.mark.parametrize("hidden_loss", ["mse", "relative"])
def test_the_hidden_term_is_the_configured_error_of_the_mapped_layers(hidden_loss):
    from kompakt.passes.distill_kd import objective_for

    teacher, student = tiny_model("llama"), tiny_model("llama", seed=1)
    config = build_config(get_pass("distill.kd"), {"hidden_weight": 1.0, "hidden_loss": hidden_loss,
                                                   "layer_map": [[1, 2], [2, 2]]})  # fmt: skip
    objective = objective_for(config, teacher.model, student.model, 1.0, config.layer_map, config.hidden_loss)
    _, parts = objective(student.model, IDS, IDS)
    with torch.no_grad():
        s = student.model(input_ids=IDS, output_hidden_states=True).hidden_states
        t = teacher.model(input_ids=IDS, output_hidden_states=True).hidden_states
    expected = []
    for i, j in ((1, 2), (2, 2)):
        error = (s[i] - t[j]).pow(2).mean(-1)  # [batch, positions]
        expected.append((error / t[j].pow(2).mean(-1) if hidden_loss == "relative" else error).mean())
    assert parts["hidden"] == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_an_unknown_hidden_loss_is_refused():
    from kompakt.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden_loss must be one of mse, relative, got 'cosine'"):
        build_config(get_pass("distill.kd"), {"hidden_weight": 1.0, "hidden_loss": "cosine"})


@pytest.fixture(scope="module")
def trained_teacher(text) -> LoadedModel:
    """A tiny llama trained on the text with cross-entropy: a teacher that knows the data."""
    teacher = tiny_model("llama", seed=0)
    _apply("distill.kd", teacher, teacher, alpha=0.0, data=str(text), steps=40, seq_len=64, batch_size=4, lr=3e-3,
           checkpoint_every=0)  # fmt: skip
    return teacher


def _heldout(teacher, text) -> torch.Tensor:
    from kompakt.train.data import load_training

    return load_training(text, teacher.tokenizer).split_heldout(0.1)[1].ids


def test_distillation_lowers_kl(text, trained_teacher):
    teacher = trained_teacher
    student = tiny_model("llama", seed=1, num_hidden_layers=2)  # a smaller student that knows nothing yet
    heldout = _heldout(teacher, text)
    kl_before = fidelity(teacher, student, heldout, window=64).kl_mean
    _apply("distill.kd", student, teacher, alpha=0.5, temperature=2.0, data=str(text), steps=30, seq_len=64,
           batch_size=4, lr=3e-3, checkpoint_every=0)  # fmt: skip
    assert fidelity(teacher, student, heldout, window=64).kl_mean < 0.2 * kl_before


def test_qat_beats_the_rtn_it_starts_from(text, trained_teacher):
    teacher = trained_teacher
    student = _copy(teacher)
    _apply("quant.rtn", student, teacher, bits=2, group_size=32)
    heldout = _heldout(teacher, text)
    kl_rtn = fidelity(teacher, student, heldout, window=64).kl_mean
    report = _apply("quant.qat", student, teacher, data=str(text), steps=30, seq_len=64, batch_size=4, lr=1e-3,
                    alpha=1.0, checkpoint_every=0)  # fmt: skip
    assert report.details["grid"] == "int2 g32 sym" and report.details["grid_source"] == "previous quant step"
    assert fidelity(teacher, student, heldout, window=64).kl_mean < 0.8 * kl_rtn


def test_merged_lora_gives_the_adapter_models_outputs(text, tmp_path):
    from peft import PeftModel

    base = tiny_model("qwen2")
    student = _copy(base)
    report = _apply("finetune.lora", student, base, work=tmp_path, data=str(text), steps=6, seq_len=32,
                    batch_size=2, lr=5e-3, r=4, target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    assert report.files["adapter"] == tmp_path / "adapter"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    adapter_model = PeftModel.from_pretrained(_copy(base).model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        expected = adapter_model(input_ids=IDS).logits
    merged = _logits(report.loaded)
    assert not torch.allclose(merged, _logits(base), atol=1e-4)  # the adapter changed something
    assert torch.allclose(merged, expected, atol=1e-5)


def test_lora_chat_data_trains_on_answers_only(tmp_path):
    import json

    records = [{"messages": [{"role": "user", "content": f"question {i} " * 3},
                             {"role": "assistant", "content": f"answer {i}."}]} for i in range(40)]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = tiny_model("llama")
    report = _apply("finetune.lora", _copy(base), base, data=str(path), **FAST)
    assert report.details["steps"] == 2
    from kompakt.train.data import load_training

    data = load_training(path, base.tokenizer)
    answers = base.tokenizer.decode(data.ids[data.targets])
    assert "answer 0.<|im_end|>" in answers and "question" not in answers and "user" not in answers


def test_training_passes_are_registered_with_their_needs():
    passes = registry()
    for name in ("distill.kd", "quant.qat", "finetune.lora"):
        spec = passes[name]
        assert spec.needs_training and spec.needs_teacher and not spec.changes_architecture
        assert "Sample recipe step" in spec.doc


def test_qat_reads_the_grid_of_a_model_stored_compressed():
    """A compressed-tensors model kompakt did not quantize (no kompakt grid recorded): QAT trains
    the grid its `quantization_config` names, read through the compression contract."""
    from kompakt.passes.quant_qat import grid_of

    loaded = tiny_model("llama")
    down = "model.layers.0.mlp.down_proj"
    assert grid_of(loaded.model) is None
    loaded.model.config.quantization_config = {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"weights": {"num_bits": 4, "group_size": 32, "symmetric": False}, "targets": [down, "re:x"]}}}
    grid, modules = grid_of(loaded.model)
    assert (grid.bits, grid.group_size, grid.symmetric, modules) == (4, 32, False, [down])
