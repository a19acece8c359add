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
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=data))
    result = run_lm_eval(tiny_model("llama"), ["kompakt_local_mc", "arc_easy"], include_path=tmp_path)
    assert 0.0 <= result.results["kompakt_local_mc"]["acc,none"] <= 1.0
    # arc_easy is on the Hub: skipped offline, unless this machine's datasets cache holds it.
    assert "arc_easy" in result.results or "offline" in result.skipped["arc_easy"]
