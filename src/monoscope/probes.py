"""Concept probes: named regular expressions label tokens in context; each unit gets an AUROC per concept.

A concept is a regex over the decoded text of a sequence; a token is a positive example when its
characters overlap a match. How well one unit's activation separates positives from the rest (AUROC,
0.5 = chance, 1 = perfect) is an LLM-free, reproducible measure of monosemanticity, comparable between
neurons and features.

Sequences are windows cut from documents, so a concept that depends on context from before the window
(a string literal opened earlier) is labelled as the regex sees the window: the same for every unit,
so the comparison stays fair.

AUROC is computed from per-unit activation histograms (positives per concept, and all tokens), so it
streams with bounded memory; values inside one histogram bin count as ties.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Defaults for the default corpus (Python source). Each pattern is compiled with re.MULTILINE.
DEFAULT_CONCEPTS: list[dict[str, str]] = [
    {"name": "comment", "pattern": r"#[^\n]*"},
    {"name": "string_literal", "pattern": r"(?s:\"\"\".*?\"\"\"|'''.*?''')|\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'"},
    {"name": "docstring", "pattern": r"^[ \t]*[rRbBuU]?(?s:\"\"\".*?\"\"\"|'''.*?''')"},  # a triple-quoted string opening a line
    {"name": "number", "pattern": r"(?<![\w.])(?:0[xX][0-9a-fA-F_]+|\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?)"},
    {"name": "def_name", "pattern": r"(?<=\bdef )\w+"},
    {"name": "class_name", "pattern": r"(?<=\bclass )\w+"},
    {"name": "decorator", "pattern": r"^[ \t]*@[\w.]+"},
    {"name": "indent_depth_2plus", "pattern": r"^(?: {8,}|\t{2,})\S[^\n]*"},
    {"name": "import_line", "pattern": r"^[ \t]*(?:from[ \t]+[\w.]+[ \t]+)?import\b[^\n]*"},
    {"name": "self", "pattern": r"\bself\b"},
    {"name": "exception_keyword", "pattern": r"\b(?:try|except|finally|raise)\b"},
]


@dataclass(frozen=True)
class Concept:
    name: str
    regex: re.Pattern


def compile_concepts(concepts: Sequence[dict[str, str]]) -> list[Concept]:
    """[{name, pattern}] -> compiled concepts; a bad entry raises naming the concept."""
    compiled, seen = [], set()
    for i, entry in enumerate(concepts):
        name, pattern = entry.get("name"), entry.get("pattern")
        if not name or not isinstance(name, str) or not isinstance(pattern, str) or not pattern:
            raise ValueError(f"features.concepts[{i}]: needs a non-empty 'name' and 'pattern', got {entry!r}")
        if name in seen:
            raise ValueError(f"features.concepts[{i}]: concept name '{name}' appears twice")
        seen.add(name)
        try:
            compiled.append(Concept(name, re.compile(pattern, re.MULTILINE)))
        except re.error as error:
            raise ValueError(f"features.concepts[{i}] '{name}': invalid regular expression {pattern!r}: {error}") from error
    return compiled


class ConceptLabeler:
    """Token ids [b, s] -> bool labels [b, s, n_concepts], from the display string of every token."""

    def __init__(self, concepts: Sequence[Concept], token_strings: Sequence[str]):
        self.concepts = list(concepts)
        self.strings = list(token_strings)
        self.lengths = np.array([len(s) for s in self.strings], dtype=np.int64)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def label_sequence(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [s] -> bool [s, n_concepts]: True where the token's characters overlap a match."""
        text = "".join(self.strings[t] for t in tokens)
        lengths = self.lengths[tokens]
        ends = np.cumsum(lengths)  # [s]
        starts = ends - lengths
        labels = np.zeros((len(tokens), len(self.concepts)), dtype=bool)
        for c, concept in enumerate(self.concepts):
            spans = np.array([m.span() for m in concept.regex.finditer(text) if m.end() > m.start()], dtype=np.int64)
            if not len(spans):
                continue
            # Token i overlaps the match [a, b) iff ends[i] > a and starts[i] < b: a run of tokens.
            first = np.searchsorted(ends, spans[:, 0], side="right")
            stop = np.searchsorted(starts, spans[:, 1], side="left")
            first, stop = first[first < stop], stop[first < stop]
            runs = np.zeros(len(tokens) + 1, dtype=np.int64)  # +1 where a run starts, -1 past its end
            np.add.at(runs, first, 1)
            np.add.at(runs, stop, -1)
            labels[:, c] = np.cumsum(runs[:-1]) > 0
        labels &= (lengths > 0)[:, None]  # an empty token covers no character
        return labels

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return np.stack([self.label_sequence(seq) for seq in tokens])


def auroc_from_histograms(positives: torch.Tensor, totals: torch.Tensor, n_positive: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """AUROC of every unit for every concept, ties (same bin) counting one half.

    positives [C, U, B]: per concept, unit and ascending activation bin, the count of positive tokens;
    totals [U, B]: all tokens; n_positive [C]: positive tokens per concept. Returns float64 [C, U];
    NaN for a concept with no positive or no negative token.
    """
    positives = positives.double()
    negatives = totals.double().unsqueeze(0) - positives  # [C, U, B]
    negatives_below = negatives.cumsum(-1) - negatives  # [C, U, B]
    wins = (positives * (negatives_below + 0.5 * negatives)).sum(-1)  # [C, U]
    n_pos = n_positive.double().unsqueeze(1)  # [C, 1]
    pairs = n_pos * (n_tokens - n_pos)
    return torch.where(pairs > 0, wins / pairs.clamp_min(1), torch.full_like(wins, float("nan")))
