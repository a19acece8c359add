"""The data of a run: calibration blocks and held-out evaluation tokens, built lazily once,
their identities (for step hashes), and the per-step measurement against the original."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from kompakt.data.loader import MAX_GENERATED_CALIBRATION_TOKENS
from kompakt.errors import DataError
from kompakt.evaluate.topk import TOP_K, TopK, kl_label
from kompakt.model.inputs import Batch
from kompakt.model.loaded import LoadedModel
from kompakt.rundir.hashing import digest, file_identity
from kompakt.recipe.schema import DataSpec

logger = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1
# Sentence encoders are scored on this many held-out sentences (cosine, recall@10 among them,
# Spearman of their pairwise similarities).
EVAL_SENTENCES = 1000


class RunData:
    """Calibration blocks [n, block_len] and evaluation ids, each built on first use."""

    def __init__(self, spec: DataSpec, original: LoadedModel, seed: int) -> None:
        self.spec = spec
        self.original = original
        self.seed = seed
        self._calibration: Batch | None = None
        self._evaluation: torch.Tensor | None = None
        self._source_ids: torch.Tensor | None = None
        self._training: dict[tuple, Any] = {}
        self._sentences: tuple[list[str], list[str]] | None = None

    # --- identities (no tokenization needed) ------------------------------------------------
    def identity(self) -> str:
        """What determines the calibration blocks (part of every data-using step's hash)."""
        spec = self.spec
        what = {
            "calibration": file_identity(spec.calibration) or "generated",
            "heldout": spec.evaluation is None,
            "blocks": spec.calibration_blocks,
            "block_len": spec.block_len,
        }
        if prefix := self._prefix():  # only then: the hashes of prefix-free models stay as they were
            what["prefix"] = prefix
        if self._encoder:  # padded sentences, not token blocks (kompakt.data.sentence_batches)
            what["form"] = "sentences"
        return digest(what)

    @property
    def _encoder(self) -> bool:
        return bool(getattr(self.original, "is_encoder", False))

    def eval_identity(self, metrics: list[str]) -> str:
        """What determines a step's metrics (a run directory keeps one evaluation setting)."""
        spec = self.spec
        source = file_identity(spec.evaluation) if spec.evaluation else ["heldout", self.identity()]
        return digest({
            "evaluation": source, "tokens": spec.eval_tokens, "window": spec.window,
            "stride": spec.stride, "metrics": sorted(metrics), "kl": kl_label(TOP_K),
        })  # fmt: skip

    # --- tokens -----------------------------------------------------------------------------
    def _user_ids(self) -> torch.Tensor:
        from kompakt.data import load_tokens

        if self._source_ids is None:
            self._source_ids = load_tokens(self.spec.calibration, self.original, seed=self.seed)
        return self._source_ids

    def calibration(self) -> Batch:
        """Token blocks [calibration_blocks, block_len]; for an encoder, calibration_blocks
        sentences of at most block_len tokens, padded (kompakt.data.sentence_batches)."""
        if self._calibration is None and self._encoder:
            self._calibration = self._sentence_calibration()
        if self._calibration is None:
            from kompakt.data import load_tokens, sample_blocks, split_heldout

            spec = self.spec
            if spec.calibration is None:
                wanted = min(spec.calibration_blocks * spec.block_len, MAX_GENERATED_CALIBRATION_TOKENS)
                logger.info("generating %d calibration tokens with the original model (cached)", wanted)
                ids = load_tokens(None, self.original, n_tokens=max(wanted, spec.block_len + 1), seed=self.seed)
            else:
                ids = self._user_ids()
                if spec.evaluation is None:
                    ids, _ = split_heldout(ids, HELDOUT_FRACTION)
            prefix = self._prefix()
            blocks = sample_blocks(ids, spec.calibration_blocks, spec.block_len - len(prefix), seed=self.seed)
            self._calibration = _with_prefix(blocks, prefix)
        return self._calibration

    def _sentence_calibration(self) -> Batch:
        from kompakt.data.sentence_batches import sentence_batch
        from kompakt.data.sentences import default_sentences

        spec = self.spec
        if spec.calibration is None:
            logger.info("calibrating on %d default sentences (kompakt.data.sentences)", spec.calibration_blocks)
            sentences = default_sentences(spec.calibration_blocks)
        else:  # the run data's sentences without the held-out end the steps are scored on
            sentences = self._user_sentences()[0]
        return sentence_batch(self.original, sentences, spec.calibration_blocks, spec.block_len, seed=self.seed)

    def _prefix(self) -> list[int]:
        """What the tokenizer puts before text (Gemma's <bos>; nothing for SmolLM2): every
        calibration block starts with it, as every sequence the model sees in use does. Gemma's
        activations without it are far from those in use (its perplexity ~3x higher), so
        Hessians and scales fitted on bare blocks fit the wrong inputs."""
        from kompakt.model.tokens import prefix_ids

        tokenizer = getattr(self.original, "tokenizer", None)
        if tokenizer is None or self._encoder:  # an encoder's tokenizer adds its specials per sentence
            return []
        return prefix_ids(tokenizer)

    def training(self, source: str | None, n_tokens: int, answer_only: bool = True,
                 generator: LoadedModel | None = None) -> Any:  # fmt: skip
        """Training tokens (kompakt.train.data.TrainData) for a training pass, cached per request.

        `source` (the pass's own data) first; else the run's data (its held-out end excluded
        when evaluation is held out of it); else text sampled by `generator` (default: the
        original) — sequence-level distillation, cached on disk.
        """
        from kompakt.train.sources import training_tokens

        generator = generator or self.original
        spec = self.spec
        key = (source, n_tokens, answer_only, None if source or spec.calibration else generator.fingerprint())
        if key not in self._training:
            if source is None and spec.calibration is not None:
                data = training_tokens(spec.calibration, self.original, None, answer_only=answer_only)
                if spec.evaluation is None:
                    data, _ = data.split_heldout(HELDOUT_FRACTION)
            else:
                data = training_tokens(source, self.original, n_tokens, seed=self.seed, answer_only=answer_only,
                                       generator=generator)  # fmt: skip
            self._training[key] = data
        return self._training[key]

    # --- sentences (encoders) ----------------------------------------------------------------
    def _user_sentences(self) -> tuple[list[str], list[str]]:
        """The run data's sentences as (training part, held-out end); the end is empty when
        data.evaluation is given."""
        from kompakt.data.sentences import read_sentences

        if self._sentences is None:
            sentences = read_sentences(self.spec.calibration)
            cut = len(sentences) if self.spec.evaluation is not None else len(sentences) - max(
                1, round(len(sentences) * HELDOUT_FRACTION))  # fmt: skip
            self._sentences = (sentences[:cut], sentences[cut:])
        return self._sentences

    def sentences(self, source: str | None, n: int) -> tuple[list[str], str]:
        """(training sentences, where from) for an encoder: the pass's `source`, else the run's
        data (its held-out end excluded), else `n` default sentences (kompakt.data.sentences)."""
        from kompakt.data.sentences import DEFAULT_SOURCE, default_sentences, read_sentences

        if source is not None:
            return read_sentences(source), str(source)
        if self.spec.calibration is not None:
            return self._user_sentences()[0], str(self.spec.calibration)
        return default_sentences(n), f"sentences from text generated by {DEFAULT_SOURCE}"

    def eval_sentences(self) -> tuple[list[str], str]:
        """(held-out sentences, where from) an encoder's steps are scored on (EVAL_SENTENCES at most):
        data.evaluation, else the held-out end of the run's data, else kompakt's shipped held-out
        sentences (kompakt.evaluate.sentences)."""
        from kompakt.data.sentences import read_sentences

        spec = self.spec
        if spec.evaluation is not None:
            sentences, where = read_sentences(spec.evaluation), str(spec.evaluation)
        elif spec.calibration is not None:
            sentences = self._user_sentences()[1]
            where = f"the held-out last {HELDOUT_FRACTION:.0%} of the sentences of {spec.calibration}"
        else:  # the set `kompakt eval` scores on by default (shipped, never trained on, no generation)
            from kompakt.evaluate.sentences import default_sentences as shipped

            chosen = shipped(EVAL_SENTENCES)
            sentences, where = chosen.sentences, chosen.source
        if len(sentences) < 20:
            raise DataError(f"evaluation sentences ({where}) number {len(sentences)}; give at least 20 (more text or "
                            "data.evaluation)")  # fmt: skip
        return sentences[:EVAL_SENTENCES], where

    def evaluation(self) -> torch.Tensor:
        if self._evaluation is None:
            from kompakt.data import load_tokens, split_heldout

            spec = self.spec
            if spec.evaluation is not None:
                ids = load_tokens(spec.evaluation, self.original, seed=self.seed)
                where = str(spec.evaluation)
            elif spec.calibration is None:
                # Held out from the same source: generated with another seed.
                ids = load_tokens(None, self.original, n_tokens=spec.eval_tokens, seed=self.seed + 1)
                where = "self-generated text"
            else:
                _, ids = split_heldout(self._user_ids(), HELDOUT_FRACTION)
                where = f"the held-out last {HELDOUT_FRACTION:.0%} of {spec.calibration}"
            ids = ids[: spec.eval_tokens]
            if ids.numel() < spec.window:
                raise DataError(
                    f"evaluation text ({where}) has {ids.numel()} tokens, fewer than one window of "
                    f"{spec.window}; give more text, data.evaluation, or a smaller data.window"
                )
            self._evaluation = ids
        return self._evaluation


# --- measurement ------------------------------------------------------------------------------


def measurer_for(original: LoadedModel, data: RunData, metrics: list[str], reference_dir: Path | None = None):
    """The step measurement for `original`'s kind: next-token fidelity for a language model,
    embedding fidelity for a sentence encoder (kompakt.recipe.encoder_measure)."""
    if original.is_encoder:
        from kompakt.recipe.encoder_measure import EncoderMeasurer

        return EncoderMeasurer(original, data, metrics, reference_dir)
    return Measurer(original, data, metrics, reference_dir)


class Measurer:
    """Metrics of a step's model against the original; the original's own numbers cached.

    KL and top-1 are scored against the original's distributions on the evaluation text,
    computed once and kept at top-k (kompakt.evaluate.topk) in `reference_dir`, so every step
    and every run sharing the directory (the attempts of `compress --target`) runs only the
    candidate. The KL is the bucketed one (a lower bound of the full-vocabulary KL, within
    3-4 % on the embedded models); `kompakt eval` measures the full one.
    """

    def __init__(self, original: LoadedModel, data: RunData, metrics: list[str],
                 reference_dir: Path | None = None) -> None:  # fmt: skip
        self.original = original
        self.data = data
        self.metrics = metrics
        self.reference_dir = reference_dir
        self._reference_ppl: float | None = None
        self._reference_speed: Any = None
        self._topk: TopK | None = None

    def _window(self) -> dict[str, Any]:
        spec = self.data.spec
        return dict(window=spec.window, stride=spec.stride, max_tokens=spec.eval_tokens)

    def reference(self) -> TopK:
        """The original's top-k distributions on the evaluation text (computed once, cached)."""
        from kompakt.evaluate.fidelity import reference_topk

        if self._topk is not None:
            return self._topk
        key = digest({"model": self.original.fingerprint(), "eval": self.data.eval_identity(["kl"])})
        path = None if self.reference_dir is None else self.reference_dir / f"{key}.safetensors"
        if path is not None and path.is_file():
            self._topk = TopK.load(path)
        else:
            self._topk = reference_topk(self.original, self.data.evaluation(), k=TOP_K, **self._window())
            if path is not None:
                self._topk.save(path)
        return self._topk

    def baseline(self) -> dict[str, Any]:
        """The original's size (and speed when asked): row 0 of the trajectory."""
        from kompakt.evaluate import disk_bytes

        row: dict[str, Any] = {"parameters": self.original.num_parameters(), "bytes": disk_bytes(self.original.path)}
        metrics: dict[str, Any] = {}
        if "speed" in self.metrics:
            metrics.update(self._speed(self.original, reference=True))
        row["metrics"] = metrics
        return row

    def measure(self, candidate: LoadedModel) -> dict[str, Any]:
        from kompakt.evaluate import perplexity

        from kompakt.evaluate.fidelity import fidelity_topk
        from kompakt.evaluate.fidelity_mapped import fidelity_across
        from kompakt.evaluate.vocab_map import vocab_map

        ids, window = self.data.evaluation(), self._window()
        out: dict[str, Any] = {}
        vmap = vocab_map(self.original, candidate)  # a trimmed vocabulary (prune.vocab)
        if "kl" in self.metrics or "top1" in self.metrics:
            if vmap is None:
                fid = fidelity_topk(self.reference(), candidate, ids, **window)
            else:  # full KL on the kept tokens (kompakt.evaluate.fidelity_mapped: no top-k form)
                fid = fidelity_across(self.original, candidate, ids, vmap, **window)
                out.update(positions_removed=fid.positions_removed, removed_mass=fid.removed_mass)
            out.update(ppl=fid.ppl_candidate, ppl_reference=fid.ppl_reference, kl_mean=fid.kl_mean,
                       kl_p99=fid.kl_p99, top1=fid.top1, eval_tokens=fid.tokens)  # fmt: skip
            if vmap is None:
                out["kl_top_k"] = TOP_K
        elif "ppl" in self.metrics:
            if self._reference_ppl is None:
                self._reference_ppl = perplexity(self.original, ids, **window).ppl
            # The candidate reads the same text in its own tokens (per-token perplexities then
            # differ by tokenization too; kl compares the same tokens).
            result = perplexity(candidate, ids if vmap is None else vmap.translate(ids)[0], **window)
            out.update(ppl=result.ppl, ppl_reference=self._reference_ppl, eval_tokens=result.tokens_scored)
        if "ppl" in out:
            out["ppl_ratio"] = out["ppl"] / out["ppl_reference"] if out["ppl_reference"] else math.inf
        if "speed" in self.metrics:
            out.update(self._speed(candidate))
        return out

    def _speed(self, loaded: LoadedModel, reference: bool = False) -> dict[str, float]:
        from kompakt.evaluate import measure_speed

        speed = measure_speed(loaded)
        if reference:
            self._reference_speed = speed
        out = {"prefill_tps": speed.prefill_tokens_per_s, "generate_tps": speed.generate_tokens_per_s}
        base = self._reference_speed
        if base is not None and base.prefill_tokens_per_s and base.generate_tokens_per_s:
            out["prefill_speedup"] = speed.prefill_tokens_per_s / base.prefill_tokens_per_s
            out["generate_speedup"] = speed.generate_tokens_per_s / base.generate_tokens_per_s
        return out


def _with_prefix(blocks: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """[n, len(prefix) + L] blocks, each starting with `prefix`."""
    if not prefix:
        return blocks
    head = torch.tensor(prefix, dtype=blocks.dtype).expand(blocks.shape[0], -1)
    return torch.cat([head, blocks], dim=1)
