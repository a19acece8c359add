"""A candidate whose vocabulary is a subset of its reference's (prune.vocab), and the
reference's token stream rewritten for it, so the two can be compared on the same tokens.

The map is derived from the two tokenizers, nothing stored is needed: each candidate token is
the reference token with the same string, and the rows without a token (embedding padding,
image placeholders, which prune.vocab keeps in order) pair up in order. `vocab_map` returns
None when both have the same number of rows: the evaluators then run as they always did.

The comparison rule (kompakt.evaluate.fidelity_mapped applies it):

- The text is the reference's token stream (as every evaluator takes it). The candidate reads
  the same stream with each token it lacks replaced by the candidate tokenizer's pieces of that
  token's string (its BPE applied to the token alone), so both read the same text.
- A position is compared where both predict the same next token: the reference at that token's
  position, the candidate at the position of the same token in its stream. A next token the
  candidate lacks is not compared (it has no such event) and is counted:
  `positions_removed` / `positions` is the share of tokens that tokenize differently.
- KL(P_K || Q): the reference's distribution restricted to the kept ids and renormalised,
  against the candidate's; `removed_mass` is the mean reference probability of the removed
  ids. Top-1 compares the argmax of P_K with the candidate's. Both perplexities are over the
  compared positions.

With an identity map (nothing removed) this is exactly the plain KL (tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kompakt.errors import ConfigError


@dataclass
class VocabMap:
    """old_ids[new id] = reference id; `tokenizer`: the candidate's, for the pieces of a removed token."""

    old_ids: torch.Tensor  # [candidate rows] long
    reference_rows: int
    reference_strings: dict[int, str]
    tokenizer: object
    _new_of: torch.Tensor | None = None
    _pieces: dict[int, list[int]] = field(default_factory=dict)

    @property
    def new_of(self) -> torch.Tensor:
        """[reference rows] long: the candidate id of each reference id, -1 where removed."""
        if self._new_of is None:
            new_of = torch.full((self.reference_rows,), -1, dtype=torch.long)
            new_of[self.old_ids] = torch.arange(self.old_ids.numel())
            self._new_of = new_of
        return self._new_of

    def pieces(self, old_id: int) -> list[int]:
        """Candidate ids standing for reference token `old_id` (one id when it was kept)."""
        new = int(self.new_of[old_id])
        if new >= 0:
            return [new]
        if old_id not in self._pieces:
            string = self.reference_strings.get(old_id)
            if string is None:
                raise ConfigError(f"the text holds reference id {old_id}, which has no token; tokenize it with a tokenizer")
            model = self.tokenizer.backend_tokenizer.model  # the BPE alone: no normalizer, no pre-tokenizer
            self._pieces[old_id] = [token.id for token in model.tokenize(string)]
        return self._pieces[old_id]

    def translate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate ids, start) for reference ids [n]: start[i] is the candidate position of
        reference token i's first piece."""
        out: list[int] = []
        start = torch.empty(ids.numel(), dtype=torch.long)
        for i, old in enumerate(ids.tolist()):
            start[i] = len(out)
            out.extend(self.pieces(old))
        return torch.tensor(out, dtype=torch.long), start


def _rows(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _strings(tokenizer) -> dict[int, str]:
    return {index: token for token, index in tokenizer.get_vocab().items()}


def vocab_map(reference, candidate) -> VocabMap | None:
    """The map from `candidate`'s ids to `reference`'s (LoadedModels), or None when their
    vocabularies have the same size (compared id for id, as always). ConfigError when the
    candidate's vocabulary is not a subset of the reference's."""
    ref_rows, cand_rows = _rows(reference.model), _rows(candidate.model)
    if ref_rows == cand_rows:
        return None
    ref_tok, cand_tok = getattr(reference, "tokenizer", None), getattr(candidate, "tokenizer", None)
    if ref_tok is None or cand_tok is None or not hasattr(cand_tok, "backend_tokenizer"):
        raise ConfigError(f"reference and candidate have different vocabularies ({ref_rows} vs {cand_rows}) "
                          "and no fast tokenizers to match them; compare models that share a tokenizer")  # fmt: skip
    ref_strings, cand_strings = _strings(ref_tok), _strings(cand_tok)
    ref_ids = {token: index for index, token in ref_strings.items()}
    ref_bare = [i for i in range(ref_rows) if i not in ref_strings]
    cand_bare = [i for i in range(cand_rows) if i not in cand_strings]
    missing = [token for token in cand_strings.values() if token not in ref_ids]
    if missing or len(ref_bare) != len(cand_bare) or cand_rows > ref_rows:
        what = f"tokens {missing[:3]} are not in the reference" if missing else "their rows without a token differ"
        raise ConfigError(f"the candidate's vocabulary ({cand_rows}) is not a trimmed reference vocabulary "
                          f"({ref_rows}): {what}; compare models that share a tokenizer")  # fmt: skip
    old_ids = torch.empty(cand_rows, dtype=torch.long)
    for index, token in cand_strings.items():
        if index < cand_rows:
            old_ids[index] = ref_ids[token]
    old_ids[cand_bare] = torch.tensor(ref_bare, dtype=torch.long)
    return VocabMap(old_ids, ref_rows, ref_strings, cand_tok)
