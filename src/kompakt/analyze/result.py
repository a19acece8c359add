"""`Analysis`: everything phase 1 found out about a model, as objects and as JSON."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from kompakt.analyze.breakdown import Breakdown
from kompakt.scoring.channels import ChannelImportance
from kompakt.scoring.experts import ExpertStats

SCHEMA = 1


@dataclass
class Analysis:
    """Result of `kompakt.analyze.analyze`.

    Attributes:
        model: name, path, model_type and shape of the model (layers, hidden, heads, ...).
        settings: token counts and options used (calibration blocks, held-out windows, quant).
        breakdown: parameters and bytes by component and layer.
        layers: one dict per decoder layer: index, params, bytes, block_influence,
            skip {ppl, kl, top1}, quant {ppl, kl, top1}, mlp_tiny_fraction. For an encoder
            (settings["task"] == "embed") skip and quant are {cosine, min_cosine, loss}.
        channels: MLP-channel / head / KV-group importances per layer and hidden-channel importance
            (kompakt.scoring.channels; None when not computed).
        reference: perplexity of the unmodified model on the held-out windows (the number the
            skip and quant perplexities compare to) and the scored token count.
        baseline: kompakt.evaluate perplexity and speed of the model (None when not run).
        summary: the "where to cut" findings; summary["lines"] is the text version.
        timings: seconds per stage.
        files: name -> path of every file written (empty without `out`).
        notes: caveats (fallbacks, tied embeddings, ...).
        experts: an MoE's routing statistics per layer and expert (kompakt.scoring.experts:
            frequency, REAP saliency, routing entropy); None for a dense model.
    """

    model: dict
    settings: dict
    breakdown: Breakdown
    layers: list[dict]
    channels: ChannelImportance | None
    reference: dict
    baseline: dict | None
    summary: dict
    timings: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    experts: ExpertStats | None = None

    def to_dict(self) -> dict:
        """Plain JSON-able dict (full per-channel arrays included as lists)."""
        return {
            "schema": SCHEMA,
            "model": copy.deepcopy(self.model),
            "settings": copy.deepcopy(self.settings),
            "breakdown": self.breakdown.to_dict(),
            "layers": copy.deepcopy(self.layers),
            "channels": self.channels.to_dict() if self.channels is not None else None,
            "reference": copy.deepcopy(self.reference),
            "baseline": copy.deepcopy(self.baseline),
            "summary": copy.deepcopy(self.summary),
            "timings": dict(self.timings),
            "files": dict(self.files),
            "notes": list(self.notes),
            "experts": self.experts.to_dict() if self.experts is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Analysis:
        """Inverse of `to_dict` (e.g. from a saved analysis.json)."""
        channels = data.get("channels")
        return cls(
            model=data["model"],
            settings=data["settings"],
            breakdown=Breakdown.from_dict(data["breakdown"]),
            layers=data["layers"],
            channels=ChannelImportance.from_dict(channels) if channels is not None else None,
            reference=data["reference"],
            baseline=data.get("baseline"),
            summary=data["summary"],
            timings=data.get("timings", {}),
            files=data.get("files", {}),
            notes=data.get("notes", []),
            experts=ExpertStats.from_dict(data["experts"]) if data.get("experts") else None,
        )

    @property
    def is_encoder(self) -> bool:
        """An embedding model's analysis: layer costs are 1 - cosine of sentence embeddings
        (layers[i]["skip"]["loss"]), not next-token KL (["skip"]["kl"])."""
        return self.settings.get("task") == "embed"

    @property
    def cost(self) -> tuple[str, str]:
        """(key of the per-layer cost in layers[i]["skip"] / ["quant"], its label for plots)."""
        return ("loss", "1 - cosine of sentence embeddings") if self.is_encoder else ("kl", "KL (nats)")

    def column(self, *keys: str) -> list[float]:
        """One number per layer, e.g. column("skip", "kl") or column("block_influence")."""
        values = []
        for row in self.layers:
            value = row
            for key in keys:
                value = value[key]
            values.append(value)
        return values
