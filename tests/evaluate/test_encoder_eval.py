"""`evaluate` on sentence encoders: a tiny encoder against itself and a perturbed copy, the
seam in kompakt.evaluate.evaluate, mixed kinds refused, truncation counted."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kompakt.errors import ConfigError, DataError
from kompakt.evaluate import EncoderEvalResult, evaluate, evaluate_encoder
from kompakt.model.tiny import tiny_encoder, tiny_model

FEW = 120  # sentences: enough for recall@10 to mean something, quick on a tiny model


@pytest.fixture(scope="module")
def teacher():
    return tiny_encoder("bert", seed=0)


def _perturbed(loaded, scale: float, seed: int = 1):
    """A copy with Gaussian noise of `scale` x each weight matrix's std added to every Linear."""
    other = copy.deepcopy(loaded)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in other.model.modules():
            if isinstance(module, torch.nn.Linear):
                noise = torch.randn(module.weight.shape, generator=generator)
                module.weight += scale * module.weight.std() * noise
    other.name = f"{loaded.name}+noise{scale}"
    return other


def test_an_encoder_against_itself_is_perfect(teacher, one_thread):
    result = evaluate(teacher, teacher, max_sentences=FEW, speed=False)
    assert isinstance(result, EncoderEvalResult)
    assert result.cosine_mean == pytest.approx(1.0, abs=1e-5)
    assert result.recall_at_k == pytest.approx(1.0)
    assert result.spearman == pytest.approx(1.0, abs=1e-6)
    assert (result.sentences, result.k, result.queries) == (FEW, 10, FEW)
    assert result.pairs == FEW * (FEW - 1) // 2
    assert result.parameters == sum(p.numel() for p in teacher.model.parameters())
    assert "held-out" in result.data and result.peak_rss_bytes > 0


def test_a_perturbed_copy_scores_lower_the_more_it_is_perturbed(teacher, one_thread):
    mild = evaluate_encoder(_perturbed(teacher, 0.05), teacher, max_sentences=FEW, speed=False)
    strong = evaluate_encoder(_perturbed(teacher, 0.5), teacher, max_sentences=FEW, speed=False)
    assert 1.0 > mild.cosine_mean > strong.cosine_mean
    assert mild.cosine_min <= mild.cosine_p05 <= mild.cosine_mean
    assert mild.recall_at_k > strong.recall_at_k
    assert mild.spearman > strong.spearman
    assert strong.recall_at_k < 1.0


def test_another_family_is_compared_by_recall_and_spearman_only_when_widths_differ(teacher, one_thread):
    other = tiny_encoder("roberta", seed=3)  # another tokenizer; same width 64
    same_width = evaluate_encoder(other, teacher, max_sentences=FEW, speed=False)
    assert same_width.cosine_mean is not None and same_width.recall_at_k < 1.0
    narrow = copy.deepcopy(teacher)
    narrow.model.pooler = None
    keep = torch.arange(32)  # a student whose sentence embedding is half as wide

    def half(module, args, output):
        output.last_hidden_state = output.last_hidden_state[..., keep]
        return output

    narrow.model.register_forward_hook(half)
    result = evaluate_encoder(narrow, teacher, max_sentences=FEW, speed=False)
    assert result.cosine_mean is None and "different widths" in result.extra["cosine"]
    assert 0.0 < result.recall_at_k <= 1.0 and -1.0 <= result.spearman <= 1.0


def test_speed_size_and_json(teacher, one_thread):
    result = evaluate(teacher, None, max_sentences=40)
    assert result.reference is None and result.cosine_mean is None
    speed = result.speed
    assert speed.batch1_per_s > 0 and speed.batched_per_s > 0 and speed.batch_size == 32
    assert speed.threads == 1 and speed.backend.startswith("torch")
    assert speed.batch1_sentences == 64 and speed.batched_sentences == 256  # sentences reused in order
    data = json.loads(json.dumps(result.to_dict()))
    assert data["kind"] == "encoder" and data["speed"]["batch_size"] == 32


def test_long_sentences_are_truncated_and_counted(teacher, tmp_path, one_thread):
    path = tmp_path / "long.txt"
    long = "word " * 200  # 1000 characters: the tiny WordPiece tokenizer reads letters, limit 128
    path.write_text("\n".join([f"Sentence number {i} is short." for i in range(20)] + [long + "end."]))
    result = evaluate_encoder(teacher, teacher, data=path, speed=False)
    assert result.sentences == 21
    assert [(t.limit, t.truncated) for t in result.truncation] == [(128, 1), (128, 1)]
    assert result.recall_at_k == pytest.approx(1.0)


def test_mixed_kinds_and_bad_input_are_one_line_errors(teacher, tmp_path):
    decoder = tiny_model("llama")
    for candidate, reference in ((teacher, decoder), (decoder, teacher)):
        with pytest.raises(ConfigError, match="sentence encoder but .* causal LM") as info:
            evaluate(candidate, reference)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="token ids"):
        evaluate(teacher, teacher, torch.zeros(1, 8, dtype=torch.long))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError):
        evaluate(teacher, teacher, data=empty)
    few = tmp_path / "few.txt"
    few.write_text("Number one is here.\nNumber two is here.\nNumber three is here.\n")
    with pytest.raises(ConfigError, match="more than 10 sentences"):
        evaluate(teacher, teacher, data=few, speed=False)
