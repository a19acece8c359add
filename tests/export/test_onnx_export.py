"""`kompakt export --format onnx`: sentence encoders in onnxruntime give kompakt's embeddings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kompakt.errors import ConfigError
from kompakt.export import export, verify_manifest
from kompakt.export.onnx_check import MAX_ABS_F32, check_onnx
from kompakt.model.encode import embed, tokenize
from kompakt.model.sentence import Pooling
from kompakt.model.tiny_encoder import TINY_ENCODERS, save_tiny_encoder, tiny_encoder

# Unlike the check's own sentences: other lengths and batch sizes than the export's example
# (2 x 8), one longer than the tiny encoders' 128 positions (truncated by the exported tokenizer).
SENTENCES = ["Ein Satz auf Deutsch.", "the cat sat on the mat", "x" * 20 + " " + "long words " * 60]


def _run(directory, sentences):
    """The export as a user runs it: its own tokenizer with truncation=True, then onnxruntime."""
    import onnxruntime
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    session = onnxruntime.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    encoded = tokenizer(sentences, padding=True, truncation=True, return_tensors="np")
    names = [i.name for i in session.get_inputs()]
    embedding, hidden = session.run(["sentence_embedding", "last_hidden_state"], {n: encoded[n] for n in names})
    return embedding, hidden, names


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    """Tiny BERT exported once (f32) for the tests that only read an export."""
    loaded = tiny_encoder("bert")
    out = tmp_path_factory.mktemp("onnx") / "enc"
    return loaded, export(loaded, format="onnx", out=out)


@pytest.mark.parametrize("family", TINY_ENCODERS)
def test_f32_export_agrees_with_embed(family, tmp_path):
    loaded = tiny_encoder(family)
    result = export(loaded, format="onnx", out=tmp_path / "enc")
    assert result.check.passed and result.check.max_abs <= MAX_ABS_F32 and result.check.tokenization == "same"
    assert verify_manifest(tmp_path / "enc") == []
    for sentences in (SENTENCES, SENTENCES[:1]):  # dynamic batch and sequence axes
        embedding, hidden, names = _run(tmp_path / "enc", sentences)
        assert np.abs(embedding - embed(loaded, sentences).numpy()).max() <= MAX_ABS_F32
    assert set(names) == set(tokenize(loaded, ["x"]))  # the graph asks for what the tokenizer gives
    assert hidden.shape[-1] == embedding.shape[-1] == 64


@pytest.mark.parametrize("family", TINY_ENCODERS)
def test_int8_keeps_one_fused_attention_node_per_layer(family, tmp_path):
    """Opset 23's Attention op, one per layer, survives onnxruntime's quantizer (which would turn it
    into a QAttention it then rejects) while every projection becomes an integer MatMul."""
    import onnx

    loaded = tiny_encoder(family)
    export(loaded, format="onnx", type="int8", out=tmp_path / "enc")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "enc" / "model.onnx")).graph.node]
    assert ops.count("Attention") == loaded.model.config.num_hidden_layers and "QAttention" not in ops
    assert "Softmax" not in ops and "MatMul" not in ops and ops.count("MatMulInteger") >= 4


@pytest.mark.parametrize("mode", ["max", "lasttoken"])  # mean in every other test; cls is lasttoken's indexing
def test_every_pooling_mode_is_inside_the_graph(mode, tmp_path):
    loaded = dataclasses.replace(tiny_encoder("distilbert"), pooling=Pooling(mode, normalize=False, max_seq_length=100))
    result = export(loaded, format="onnx", out=tmp_path / "enc", verify=False)  # this test is the check
    assert result.check is None and not (tmp_path / "enc" / "kompakt-verify.json").exists()
    assert verify_manifest(tmp_path / "enc") == []
    embedding, _, _ = _run(tmp_path / "enc", SENTENCES)
    assert np.abs(embedding - embed(loaded, SENTENCES).numpy()).max() <= MAX_ABS_F32
    assert abs(float(np.linalg.norm(embedding[0])) - 1.0) > 1e-3  # not normalised, as the pooling says


def test_cli_int8_directory_is_quantized_and_close(tmp_path, cli, monkeypatch):
    import onnx

    monkeypatch.chdir(tmp_path)
    loaded = save_tiny_encoder("bert", tmp_path / "tiny")
    code, out, err = cli(["export", "tiny", "--format", "onnx", "--type", "int8"])
    assert code == 0, err
    target = tmp_path / "tiny-onnx-int8"
    names = {p.name for p in target.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "modules.json", "1_Pooling", "sentence_bert_config.json",
            "kompakt-verify.json", "SHA256SUMS"} <= names  # fmt: skip
    assert verify_manifest(target) == []
    ops = {node.op_type for node in onnx.load(str(target / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    embedding, _, _ = _run(target, SENTENCES)
    want = embed(loaded, SENTENCES).numpy()
    cosine = (embedding * want).sum(1) / np.linalg.norm(embedding, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.mean() >= 0.99
    assert "onnx int8" in out and "check: passed" in out and "mean cosine" in out
    for path in target.rglob("*"):  # it ships: no stack traces or paths of this machine inside
        data = path.read_bytes() if path.is_file() else b""
        assert str(tmp_path).encode() not in data and b"site-packages" not in data, path.name


def test_a_causal_lm_is_refused_in_one_line(tiny_dir, cli):
    code, _, err = cli(["export", str(tiny_dir), "--format", "onnx"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "causal language model" in err and "--format gguf" in err
    assert sorted(p.name for p in tiny_dir.parent.iterdir() if p.name != "cache") == ["tiny"]


def test_bad_type_and_existing_output_are_refused_before_loading(tmp_path, cli):
    code, _, err = cli(["export", str(tmp_path / "nowhere"), "--format", "onnx", "--type", "q4_0"])
    assert code == 2 and "--format onnx takes --type f32, int8" in err
    (tmp_path / "enc").mkdir()
    code, _, err = cli(["export", str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(tmp_path / "enc")])
    assert code == 2 and "exists; pass --force" in err


def test_missing_onnx_packages_are_named_before_loading(tmp_path, cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    code, _, err = cli(["export", str(tmp_path / "nowhere"), "--format", "onnx"])
    assert code == 2 and "needs onnxscript: pip install 'kompakt[encoders]'" in err


def test_exporter_failure_is_one_line_and_leaves_nothing(tmp_path, cli, monkeypatch):
    """What torch.onnx raises on an architecture it cannot trace. Every tiny family traces, so the
    failure is injected into torch.onnx.export itself: this covers the message and the cleanup."""
    import torch

    def fails(*args, **kwargs):
        raise RuntimeError("Unsupported: data-dependent control flow in aten::nonzero\nfull trace follows")

    save_tiny_encoder("roberta", tmp_path / "tiny")
    monkeypatch.setattr(torch.onnx, "export", fails)
    code, _, err = cli(["export", str(tmp_path / "tiny"), "--format", "onnx", "--out", str(tmp_path / "enc")])
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the stage lines
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "torch.onnx cannot export" in err and "data-dependent control flow" in err and "--format hf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no output, no staged directory


def test_check_fails_against_another_model(bert_export):
    _, result = bert_export
    check = check_onnx(tiny_encoder("bert", seed=1), result.path, type="f32")
    assert check.failed and "differ from the model's" in check.problems[0] and "FAILED" in check.line()


def test_a_failing_check_rejects_the_export(tmp_path, monkeypatch):
    """The graph of another seed's weights (a real export) cannot pass as this model's."""
    import kompakt.export.onnx as onnx_export
    from kompakt.export import ExportCheckError

    other, real_export = tiny_encoder("distilbert", seed=1), onnx_export.export_graph
    monkeypatch.setattr(onnx_export, "export_graph", lambda loaded, *args, **kw: real_export(other, *args, **kw))
    with pytest.raises(ExportCheckError, match="differ from the model's"):
        export(tiny_encoder("distilbert"), format="onnx", out=tmp_path / "enc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.rejected"]
    assert not (tmp_path / "enc.rejected" / "SHA256SUMS").exists()


def test_onnx_speed_counts_sentences_per_second(bert_export):
    from kompakt.export.onnx_speed import onnx_speed

    _, result = bert_export
    for batch_size in (1, 4):
        assert onnx_speed(result.path / "model.onnx", SENTENCES * 3, batch_size, threads=1) > 0
    with pytest.raises(ConfigError):
        onnx_speed(result.path / "model.onnx", [], 4)


def test_factorized_layers_export_as_they_run(tmp_path):
    """ONNX has no layer types to lose: a lowrank.svd model exports factorized (no --merge needed)."""
    import torch

    from kompakt.model.lowrank import factorize_linear

    loaded = tiny_encoder("distilbert")
    name = "transformer.layer.0.ffn.lin1"
    u, s, v = torch.linalg.svd(loaded.model.get_submodule(name).weight.detach(), full_matrices=False)
    with torch.no_grad():
        factorize_linear(loaded.model, name, up=u[:, :16] * s[:16], down=v[:16], method="svd")
    result = export(loaded, format="onnx", out=tmp_path / "enc")
    assert result.check.passed and not any("--merge" in note for note in result.notes)
    embedding, _, _ = _run(tmp_path / "enc", SENTENCES)
    assert np.abs(embedding - embed(loaded, SENTENCES).numpy()).max() <= MAX_ABS_F32
