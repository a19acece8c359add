"""Fidelity of a candidate whose vocabulary is a trimmed copy of its reference's (prune.vocab).

kompakt.evaluate.fidelity (both models run, full-vocabulary KL) under the rule of
kompakt.evaluate.vocab_map: the reference's stream, the candidate reading it with removed
tokens replaced by their pieces, positions compared where both predict the same kept token,
KL(P restricted to the kept ids, renormalised || Q). The callers (`kompakt.evaluate`, the
recipe runner's measurement) come here when `vocab_map` finds one; with the same vocabulary
nothing changes for them.

There is no top-k form: a reference kept at top-k (kompakt.evaluate.topk) lumps its tail into
one bucket, and the share of removed tokens in that bucket is unknown, which on text made of
kept tokens shows as a KL of 1e-3 where the true one is 0. So the runner's measurement of a
trimmed model runs the original again (one more forward per evaluation window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kompakt.errors import ConfigError
from kompakt.evaluate.fidelity import FidelityResult, _windows_for
from kompakt.evaluate.perplexity import forward_logits, progress_bar, room_for_window, unwrap_model, window_prefix
from kompakt.evaluate.topk import full_kl, kl_label
from kompakt.evaluate.vocab_map import VocabMap
from kompakt.evaluate.windows import Window, batches, batch_inputs

_CHUNK = 128  # positions per fp32 [chunk, vocab] block


@dataclass
class _Rows:
    """The compared positions of one window: logits rows of each model, targets in each id space,
    and how many scored positions were not compared (their next token was removed)."""

    reference: torch.Tensor
    candidate: torch.Tensor
    target_old: torch.Tensor
    target_new: torch.Tensor
    removed: int


class _Totals:
    def __init__(self) -> None:
        self.kl: list[np.ndarray] = []
        self.agree = self.count = self.removed = self.positions = 0
        self.nll_reference = self.nll_candidate = self.removed_mass = 0.0

    def add(self, kl, agree, ref_target_lp, cand_target_lp, removed_mass) -> None:
        self.kl.append(kl.double().cpu().numpy())
        self.agree += int(agree.sum())
        self.nll_reference -= float(ref_target_lp.double().sum())
        self.nll_candidate -= float(cand_target_lp.double().sum())
        self.removed_mass += float(removed_mass.double().sum())
        self.count += int(kl.numel())

    def result(self, window: int, stride: int, used: int) -> FidelityResult:
        if not self.count:
            raise ConfigError("no position of the text predicts a token the candidate kept; evaluate on other text")
        kl = np.concatenate(self.kl)
        return FidelityResult(
            kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), top1=self.agree / self.count,
            ppl_reference=math.exp(self.nll_reference / self.count), ppl_candidate=math.exp(self.nll_candidate / self.count),
            tokens=self.count, window=window, stride=stride, tokens_used=used, kl_kind=kl_label(None) + ", kept tokens",
            positions_removed=self.removed, removed_mass=self.removed_mass / self.count,
        )  # fmt: skip


def _candidate_windows(flat: torch.Tensor, windows: list[Window], vmap: VocabMap):
    """Per reference window: the candidate's input ids and the compared rows (_Rows)."""
    cand_flat, start = vmap.translate(flat)
    start = torch.cat([start, torch.tensor([cand_flat.numel()])])
    new_of = vmap.new_of
    out = []
    for item in windows:
        begin = int(start[item.start])
        inputs = cand_flat[begin : int(start[item.end])]
        offsets = torch.arange(item.score_from, item.length)
        targets = flat[item.start + offsets]
        kept = new_of[targets] >= 0
        rows = _Rows(reference=offsets[kept] - 1, candidate=start[item.start + offsets[kept]] - begin - 1,
                     target_old=targets[kept], target_new=new_of[targets[kept]], removed=int((~kept).sum()))  # fmt: skip
        out.append((inputs, rows))
    return out


def _candidate_logits(net, prefix: list[int], inputs: list[torch.Tensor], device) -> torch.Tensor:
    """[batch, longest, vocab] logits of right-padded inputs: a causal model's logits at a
    position do not depend on later tokens, so the padding changes no compared row."""
    longest = max(int(x.numel()) for x in inputs)
    padded = torch.zeros(len(inputs), longest, dtype=torch.long)
    for row, x in enumerate(inputs):
        padded[row, : x.numel()] = x
    return forward_logits(net, padded.to(device), prefix)


def _plan(model, candidate, ids, vmap: VocabMap, window, stride, max_tokens):
    """The windows over the reference's ids (`model` sets prefix and context), and per window the
    candidate's input and compared rows; ConfigError when a candidate input outgrows its context."""
    _, prefix, stride, flat, windows = _windows_for(model, ids, window, stride, max_tokens)
    mapped = _candidate_windows(flat, windows, vmap)
    room = room_for_window(unwrap_model(candidate), window_prefix(candidate))
    longest = max(int(inputs.numel()) for inputs, _ in mapped)
    if room is not None and longest > room:
        raise ConfigError(f"the candidate reads {longest} tokens for a window of {window}; use a smaller --window")
    return prefix, stride, flat, windows, mapped


def fidelity_across(reference, candidate, ids: torch.Tensor, vmap: VocabMap, *, window: int = 512,
                    stride: int | None = None, max_tokens: int | None = None, batch_size: int = 4) -> FidelityResult:  # fmt: skip
    """`fidelity` (both models run, full-vocabulary KL) for a candidate with a trimmed vocabulary."""
    ref_net, cand_net = unwrap_model(reference), unwrap_model(candidate)
    cand_prefix = window_prefix(candidate)
    ref_prefix, stride, flat, windows, mapped = _plan(reference, candidate, ids, vmap, window, stride, max_tokens)
    by_start = {item.start: entry for item, entry in zip(windows, mapped)}
    old_ids = vmap.old_ids
    totals = _Totals()
    progress, task = progress_bar("fidelity", len(windows))
    ref_device, cand_device = next(ref_net.parameters()).device, next(cand_net.parameters()).device
    with progress, torch.inference_mode():
        for group in batches(windows, batch_size):
            ref_logits = forward_logits(ref_net, batch_inputs(flat, group, ref_device), ref_prefix)
            entries = [by_start[item.start] for item in group]
            cand_logits = _candidate_logits(cand_net, cand_prefix, [inputs for inputs, _ in entries], cand_device)
            for row, (_, rows) in enumerate(entries):
                totals.removed += rows.removed
                for lo in range(0, rows.reference.numel(), _CHUNK):
                    part = slice(lo, lo + _CHUNK)
                    ref_lp = torch.log_softmax(ref_logits[row, rows.reference[part].to(ref_device)].float(), -1)
                    kept = ref_lp[:, old_ids.to(ref_device)]
                    mass = torch.logsumexp(kept, -1, keepdim=True)
                    kept = kept - mass
                    cand_lp = torch.log_softmax(cand_logits[row, rows.candidate[part].to(cand_device)].float(), -1)
                    cand_lp = cand_lp.to(ref_device)
                    totals.add(full_kl(kept, cand_lp), kept.argmax(-1) == cand_lp.argmax(-1),
                               ref_lp.gather(-1, rows.target_old[part].to(ref_device).unsqueeze(-1)),
                               cand_lp.gather(-1, rows.target_new[part].to(ref_device).unsqueeze(-1)),
                               1 - mass.exp())  # fmt: skip
            progress.advance(task, len(group))
    return totals.result(window, stride, int(flat.numel()))
