"""lm-eval adapter: a local task runs on an in-memory model; a task needing the network is skipped."""

from __future__ import annotations

import builtins
import json

import pytest

from kompakt.errors import KompaktError
from kompakt.evaluate.lm_eval_adapter import run_lm_eval
from kompakt.model.tiny import tiny_model

TASK_YAML = """task: kompakt_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_missing_lm_eval_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(KompaktError, match=r"kompakt\[eval\]"):
        run_lm_eval(tiny_model("llama"), ["kompakt_local_mc"])


@pytest.mark.slow
def test_local_task_runs_and_network_task_is_skipped(tmp_path):
    pytest.importorskip("lm_eval")
    words = "red blue cat dog sun moon tree road milk salt rain snow".split()  # choices the model ranks row by row
    rows = [{"question": f"Item {i} is", "choices": [words[i], words[(5 * i + 3) % 12]], "answer": 0} for i in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=data))
    loaded = tiny_model("llama")
    result = run_lm_eval(loaded, ["kompakt_local_mc", "arc_easy"], include_path=tmp_path)
    assert result.results["kompakt_local_mc"]["acc,none"] == pytest.approx(_expected_accuracy(loaded, rows))
    # arc_easy is on the Hub: skipped offline, unless this machine's datasets cache holds it.
    assert "arc_easy" in result.results or "offline" in result.skipped["arc_easy"]


def _expected_accuracy(loaded, rows: list[dict]) -> float:
    """What lm-eval's multiple choice computes, by hand: the choice (after a space) whose tokens
    have the highest summed log-probability after the question wins; the share of rows it gets right."""
    import torch

    def log_likelihood(context: str, continuation: str) -> float:
        prompt = loaded.tokenizer.encode(context, add_special_tokens=False)
        whole = loaded.tokenizer.encode(context + continuation, add_special_tokens=False)
        with torch.no_grad():
            log_probs = loaded.model(torch.tensor([whole])).logits[0].log_softmax(-1)
        return sum(float(log_probs[i - 1, whole[i]]) for i in range(len(prompt), len(whole)))

    right = [max(range(len(row["choices"])), key=lambda c: log_likelihood(row["question"], " " + row["choices"][c]))
             == row["answer"] for row in rows]  # fmt: skip
    return sum(right) / len(rows)
