"""The onnxruntime embedding backend: a sentence-encoder ONNX directory (`kompakt export ENC
--format onnx [--type int8]`, or the `out/export/onnx-int8` a `compress --target` run delivers)
served on /v1/embeddings.

The directory holds model.onnx with the pooling and normalisation inside the graph, the tokenizer
and the sentence-transformers files (kompakt.export.onnx). Texts are tokenized as kompakt's
embed() tokenizes them: the directory's tokenizer with its special tokens, lowercased where
sentence_bert_config.json says, cut to the tokenizer's model_max_length (which the export sets to
the model's input limit). The graph's `sentence_embedding` output is what the route returns, so
the server answers with the vectors the export's check compared with the model's own.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kompakt.errors import ConfigError, ModelFormatError
from kompakt.serve.backend import check_embedding_ids, tokenize_within


def is_onnx_dir(path: Path) -> bool:
    """A directory kompakt's ONNX export wrote (model.onnx beside a config.json). Anything but a
    directory is answered before kompakt.export (and with it torch) is imported, so choosing the
    engine for a .gguf costs no torch; a directory runs on torch or imports it for its tokenizer."""
    if not path.is_dir():
        return False
    from kompakt.export.onnx import MODEL_FILE

    return (path / MODEL_FILE).is_file() and (path / "config.json").is_file()


class OnnxEmbeddingBackend:
    """An ONNX sentence encoder on onnxruntime's CPU provider (task "embed")."""

    kind = "onnxruntime"
    task = "embed"
    has_chat_template = False

    def __init__(self, directory: Path, *, n_threads: int | None = None) -> None:
        if importlib.util.find_spec("onnxruntime") is None:
            raise ConfigError("serving an ONNX directory needs onnxruntime: pip install 'kompakt[encoders]'")
        from transformers import AutoTokenizer

        from kompakt.export.onnx import MODEL_FILE, OUTPUTS
        from kompakt.export.onnx_check import session
        from kompakt.model.sentence import read_pooling

        try:
            self.session = session(directory / MODEL_FILE, n_threads)
        except Exception as error:  # noqa: BLE001 - onnxruntime's own errors, said in one line
            raise ModelFormatError(f"onnxruntime cannot load {directory / MODEL_FILE} ({error}); export it again") from None
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.pooling = read_pooling(directory)
        self.model_id = directory.name
        self.context_length = int(min(self.tokenizer.model_max_length, self.pooling.max_seq_length))
        self.vocab_size = int(config["vocab_size"])
        self.dimensions = int(config["hidden_size"])
        self.normalize = self.pooling.normalize
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._output = OUTPUTS[0]
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids of each text with the model's special tokens, cut to context_length
        (InputTooLong for a text over it when `truncate` is False)."""
        return tokenize_within(self.tokenizer, self.pooling.texts(list(texts)), self.context_length, truncate)

    def check_ids(self, ids: Sequence[int], field_name: str) -> None:
        check_embedding_ids(ids, self.vocab_size, self.context_length, field_name)

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """The graph's sentence embeddings [len(batch), dimensions] (float32) of token-id rows, padded together."""
        width = max(len(ids) for ids in batch)
        feeds = {"input_ids": np.full((len(batch), width), self._pad_id, dtype=np.int64),
                 "attention_mask": np.zeros((len(batch), width), dtype=np.int64),
                 "token_type_ids": np.zeros((len(batch), width), dtype=np.int64)}  # fmt: skip
        for row, ids in enumerate(batch):
            feeds["input_ids"][row, : len(ids)] = ids
            feeds["attention_mask"][row, : len(ids)] = 1
        return self.session.run([self._output], {name: feeds[name] for name in self._inputs})[0].astype(np.float32)

    def close(self) -> None:
        pass
