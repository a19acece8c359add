"""How a sentence encoder turns token states into one vector: sentence-transformers' files.

A sentence-transformers directory is a transformers model plus `modules.json` (the pipeline:
Transformer -> Pooling -> optional Normalize), `1_Pooling/config.json` (which pooling) and
`sentence_bert_config.json` (the longest input, `max_seq_length`). kompakt reads these so its
embeddings equal `SentenceTransformer(dir).encode(...)`, and writes them back on save so a
compressed encoder loads there too. A directory without them gets what sentence-transformers
itself does for a plain transformers model: mean pooling, no normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kompakt.errors import ModelFormatError

POOLING_MODES = ("mean", "cls", "max", "lasttoken")
_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                 "max": "pooling_mode_max_tokens", "lasttoken": "pooling_mode_lasttoken"}  # fmt: skip
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class Pooling:
    """Pooling of an encoder's token states into a sentence embedding.

    Attributes:
        mode: "mean" (over non-padding tokens), "cls" (first token), "max" or "lasttoken".
        normalize: L2-normalise the pooled vector (sentence-transformers' Normalize module).
        max_seq_length: longest input in tokens; longer sentences are truncated to it.
        lower_case: sentence-transformers lowercases the text before tokenizing it
            (sentence_bert_config.json's do_lower_case).
    """

    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int = 512
    lower_case: bool = False

    def texts(self, sentences: list[str]) -> list[str]:
        """`sentences` as the tokenizer must see them (lowercased when the model says so)."""
        return [s.lower() for s in sentences] if self.lower_case else list(sentences)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON ({exc}); restore it from the original model") from None


def read_pooling(directory: str | Path, position_limit: int = 512) -> Pooling:
    """The pooling a sentence-transformers directory declares (mean, unnormalised when absent)."""
    directory = Path(directory)
    limit, lower = position_limit, False
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        value = _read_json(st_config)
        if isinstance(value, dict) and isinstance(value.get("max_seq_length"), int):
            limit = min(limit, value["max_seq_length"])
        lower = isinstance(value, dict) and value.get("do_lower_case") is True
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return Pooling(mode="mean", normalize=False, max_seq_length=limit, lower_case=lower)
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise ModelFormatError(f"{modules_path} is not a list of modules; restore it from the original model")
    types = [m.get("type") for m in modules if isinstance(m, dict)]
    mode = "mean"
    pooling_entry = next((m for m in modules if isinstance(m, dict) and m.get("type") == _ST_POOLING), None)
    if pooling_entry is not None:
        config = _read_json(directory / pooling_entry.get("path", "1_Pooling") / "config.json")
        chosen = [name for name, key in _POOLING_KEYS.items() if isinstance(config, dict) and config.get(key)]
        if len(chosen) != 1:
            raise ModelFormatError(
                f"{directory} pools by {chosen or 'nothing'}; kompakt supports exactly one of {', '.join(POOLING_MODES)}"
            )
        mode = chosen[0]
    return Pooling(mode=mode, normalize=_ST_NORMALIZE in types, max_seq_length=limit, lower_case=lower)


def write_sentence_files(directory: str | Path, pooling: Pooling, hidden_size: int) -> None:
    """Write modules.json, 1_Pooling/config.json and sentence_bert_config.json (into a directory
    being written atomically by the caller), so `SentenceTransformer(directory)` loads it."""
    directory = Path(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_TRANSFORMER},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_POOLING}]  # fmt: skip
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_NORMALIZE})
    pooling_config = {"word_embedding_dimension": hidden_size}
    pooling_config.update({key: name == pooling.mode for name, key in _POOLING_KEYS.items()})
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2), encoding="utf-8")
    (directory / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    st_config = {"max_seq_length": pooling.max_seq_length, "do_lower_case": pooling.lower_case}
    (directory / "sentence_bert_config.json").write_text(json.dumps(st_config, indent=2), encoding="utf-8")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Sentence embeddings [batch, dim] from token states [batch, tokens, dim] and the mask
    [batch, tokens] (1 = real token), computed in float32 as sentence-transformers does."""
    hidden = hidden.float()
    mask = attention_mask.to(hidden.device).unsqueeze(-1).float()
    if pooling.mode == "mean":
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif pooling.mode == "cls":
        pooled = hidden[:, 0]
    elif pooling.mode == "max":
        pooled = hidden.masked_fill(mask == 0, -1e9).max(1).values
    else:  # lasttoken: the last real token of each (right-padded) row
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
    return torch.nn.functional.normalize(pooled, dim=-1) if pooling.normalize else pooled
