"""`LoadedModel`: a model, its tokenizer and where they came from, as every API function takes them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kompakt.model.gguf_blocks import GgufBlocks
from kompakt.model.sentence import Pooling


@dataclass
class LoadedModel:
    """A causal LM or a sentence encoder, ready to run (eval mode, compute dtype chosen for the hardware).

    Attributes:
        model: the transformers model.
        tokenizer: its tokenizer (chat template included when the model has one).
        name: display name: the embedded name, the directory name or the hub id.
        path: local Hugging Face directory holding config.json and weights; None for a
            model built in memory (tiny test models).
        storage_dtype: the dtype the weights are stored in (saved back in this dtype).
        gguf_blocks: module name -> the exact GGUF bytes a quant pass chose for its weight, where
            the dense weight alone cannot give them back (kompakt.model.gguf_blocks).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: Path | None = None
    storage_dtype: torch.dtype = torch.float32
    gguf_blocks: dict[str, GgufBlocks] = field(default_factory=dict)
    pooling: Pooling | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def is_encoder(self) -> bool:
        """A sentence encoder (embeddings out), not a causal LM (next-token logits out)."""
        return self.pooling is not None

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """Longest sequence the model was built for (max_position_embeddings)."""
        config = self.model.config
        text_config = getattr(config, "get_text_config", lambda: config)()
        return int(getattr(text_config, "max_position_embeddings", 2048))

    def num_parameters(self) -> int:
        """Unique parameters (tied embeddings counted once)."""
        seen: set[int] = set()
        total = 0
        for param in self.model.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
        return total

    def fingerprint(self) -> str:
        """A short stable id of the weights, for caches keyed by model (e.g. generated data)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self.model.config.to_json_string(use_diff=False).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                # Strided sample: cheap on a 8B model, still changes with any real edit.
                sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
                digest.update(name.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(sample)
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint
