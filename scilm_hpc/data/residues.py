"""Protein sequences before tokenisation: residues checked against the tokenizer.

For a protein corpus (``data.residue_separator`` set, or FASTA input) every
sequence is upper-cased, whitespace inside it is dropped and a trailing ``*``
(stop codon) is stripped. Each residue must be a character the model's tokenizer
knows (one that does not become its unknown token); what happens to one it does not
know is ``data.unknown_residue``:

- ``refuse`` (default): a UserError naming the record, the character and its position;
- ``map_x``: the residue becomes ``X`` (which the tokenizer must know);
- ``skip``: the residue is dropped (with its tag, for per-residue labels).

Residues are then joined with the separator (``""`` for ESM-style tokenizers, ``" "``
for AntiBERTy or ProtBert, whose tokenizers split words) for sequence tasks; for
per-residue tags each residue is a word already. The manifest counts every unknown
character (``residues``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from scilm_hpc.data.readers import MAX_REPORTED, Example
from scilm_hpc.errors import UserError

MAP_TO = "X"


class ResidueVocabulary:
    """Which single characters ``tokenizer`` knows (cached per character)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._known: dict[str, bool] = {}

    def knows(self, residue: str) -> bool:
        """Whether ``residue`` tokenises to something other than the unknown token."""
        if residue not in self._known:
            ids = self.tokenizer(residue, add_special_tokens=False)["input_ids"]
            unk = self.tokenizer.unk_token_id
            self._known[residue] = bool(ids) and (unk is None or unk not in ids)
        return self._known[residue]


def clean_sequence(sequence: str) -> str:
    """Upper case, no whitespace, no trailing stop codon ``*``."""
    residues = "".join(sequence.split()).upper()
    return residues[:-1] if residues.endswith("*") else residues


class ResidueChecker:
    """Applies the unknown-residue policy to examples and counts what it met.

    Args:
        tokenizer: the model's tokenizer.
        separator: ``data.residue_separator`` (``""`` or ``" "``).
        policy: ``data.unknown_residue`` (``refuse``, ``map_x``, ``skip``).

    Raises:
        UserError: for ``map_x`` with a tokenizer that does not know ``X``.
    """

    def __init__(self, tokenizer: Any, separator: str, policy: str) -> None:
        self.vocabulary = ResidueVocabulary(tokenizer)
        self.separator, self.policy = separator, policy
        if policy == "map_x" and not self.vocabulary.knows(MAP_TO):
            raise UserError(
                f"data.unknown_residue=map_x: the tokenizer does not know '{MAP_TO}' "
                f"either; use skip or refuse"
            )
        self.unknown: Counter[str] = Counter()
        self.records_with_unknown = 0
        self.problems: list[str] = []

    def _residues(
        self, ex: Example, residues: list[str], tags: list[str] | None
    ) -> tuple[list[str], list[str] | None]:
        out: list[str] = []
        out_tags: list[str] | None = [] if tags is not None else None
        seen = False
        for position, residue in enumerate(residues, start=1):
            if not self.vocabulary.knows(residue):
                self.unknown[residue] += 1
                seen = True
                if self.policy == "refuse":
                    if len(self.problems) < MAX_REPORTED:
                        self.problems.append(
                            f"{ex.source}: residue {residue!r} at position {position} is "
                            f"not in the tokenizer's vocabulary (data.unknown_residue="
                            f"refuse; map_x or skip to proceed)"
                        )
                    continue
                if self.policy == "skip":
                    continue
                residue = MAP_TO
            out.append(residue)
            if out_tags is not None and tags is not None:
                out_tags.append(tags[position - 1])
        self.records_with_unknown += seen
        if not out and self.policy == "skip":
            self.problems.append(f"{ex.source}: no residue left after skipping unknown ones")
        return out, out_tags

    def example(self, ex: Example) -> Example:
        """``ex`` with its residues cleaned, checked and (sequence tasks) joined."""
        if ex.words is not None:
            words = [w.strip().upper() for w in ex.words]  # the reader dropped a stop codon
            residues, tags = self._residues(ex, words, list(ex.tags or ()) or None)
            return replace(ex, words=tuple(residues), tags=None if tags is None else tuple(tags))
        residues, _ = self._residues(ex, list(clean_sequence(ex.text or "")), None)
        return replace(ex, text=self.separator.join(residues))

    def examples(self, examples: list[Example]) -> list[Example]:
        """Every example through ``example``; raises the problems found together.

        Raises:
            UserError: naming record and character of each unknown residue (``refuse``).
        """
        out = [self.example(ex) for ex in examples]
        self.raise_problems()
        return out

    def raise_problems(self) -> None:
        """Raise the problems ``example`` has found so far, if any.

        Raises:
            UserError: naming record and character of each unknown residue (``refuse``).
        """
        if self.problems:
            more = sum(self.unknown.values()) - len(self.problems)
            tail = [f"... and {more} more unknown residue(s)"] if more > 0 else []
            raise UserError(self.problems + tail)

    def check_tokenisation(self, ex: Example) -> None:
        """Refuse a separator that makes the tokenizer produce unknown tokens from
        residues it knows one by one (AntiBERTy wants ``" "``, not ``""``).

        Raises:
            UserError: naming the record and the setting to change.
        """
        if ex.text is None:
            return
        ids = self.vocabulary.tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        unk = self.vocabulary.tokenizer.unk_token_id
        if unk is not None and unk in ids:
            hint = "' '" if self.separator == "" else "''"
            raise UserError(
                f"data.residue_separator={self.separator!r}: the tokenizer turns residues "
                f"of {ex.source} into its unknown token although it knows each of them; "
                f"try data.residue_separator={hint}"
            )

    def summary(self) -> dict[str, Any]:
        """The manifest's ``residues`` entry."""
        return {
            "separator": self.separator,
            "unknown_policy": self.policy,
            "unknown": dict(sorted(self.unknown.items())),
            "records_with_unknown": self.records_with_unknown,
        }
