"""`kompakt eval` on sentence encoders saved as directories: the table, JSON, and one-line
errors (exit 2) for a decoder reference, an empty sentence file, a bad --max-sentences."""

from __future__ import annotations

import json

import pytest

from kompakt.model.tiny import save_tiny, save_tiny_encoder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    save_tiny_encoder("bert", root / "teacher", seed=0)
    save_tiny_encoder("bert", root / "student", seed=1)
    save_tiny("llama", root / "decoder")
    sentences = root / "sentences.txt"
    sentences.write_text("".join(f"Sentence {i} talks about topic {i % 7}. Part two of {i} follows.\n" for i in range(30)))
    (root / "empty.txt").write_text("\n \n")
    return root


def _one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_json_of_a_student_against_its_teacher(cli, dirs, one_thread):
    code, out, err = cli(["eval", str(dirs / "student"), "--reference", str(dirs / "teacher"),
                          "--data", str(dirs / "sentences.txt"), "--json", "--no-speed"])  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "encoder" and result["sentences"] == 60  # two sentences per line
    assert 0 < result["recall_at_k"] < 1 and result["k"] == 10
    assert -1 <= result["spearman"] <= 1 and result["cosine_mean"] < 1
    assert result["disk_bytes"] > 0 and result["speed"] is None
    assert result["data"].startswith(str(dirs / "sentences.txt"))


def test_table_states_sentences_metrics_and_speed(cli, dirs, one_thread):
    code, out, err = cli(["eval", str(dirs / "teacher"), "--reference", str(dirs / "teacher"),
                          "--max-sentences", "40", "--threads", "1"])  # fmt: skip
    assert code == 0, err
    for expected in ("sentence encoder", "held-out", "990", "neighbour recall@10", "100.00 %", "Spearman",
                     "sentences/s, batch 1", "sentences/s, batch 32", "128 tokens; none longer"):  # fmt: skip
        assert expected in out, out


def test_a_decoder_reference_is_refused_in_one_line(cli, dirs):
    code, _, err = cli(["eval", str(dirs / "student"), "--reference", str(dirs / "decoder"), "--no-speed"])
    assert "causal LM" in _one_line(code, err)
    code, _, err = cli(["eval", str(dirs / "decoder"), "--reference", str(dirs / "teacher"), "--no-speed"])
    assert "sentence encoder" in _one_line(code, err)


def test_an_empty_sentence_file_and_bad_max_sentences_are_one_line_errors(cli, dirs):
    code, _, err = cli(["eval", str(dirs / "student"), "--reference", str(dirs / "teacher"),
                        "--data", str(dirs / "empty.txt"), "--no-speed"])  # fmt: skip
    assert "empty" in _one_line(code, err) or "no sentences" in err
    code, _, err = cli(["eval", str(dirs / "student"), "--max-sentences", "1"])
    assert "--max-sentences" in _one_line(code, err)


def test_sentences_past_the_input_limit_are_truncated_and_said_so(cli, dirs, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    path = tmp_path / "long.txt"
    path.write_text("".join(f"Short sentence number {i} here.\n" for i in range(12)) + "A long one " + "x " * 300 + "end.\n")
    code, out, err = cli(["eval", str(dirs / "student"), "--reference", str(dirs / "teacher"),
                          "--data", str(path), "--no-speed"])  # fmt: skip
    assert code == 0, err
    assert "128 tokens; 1 longer, kept their first 128" in out, out
