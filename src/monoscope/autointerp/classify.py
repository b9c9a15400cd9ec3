"""Detection and fuzzing scorers (after delphi, Paulo et al. 2024): one short yes/no answer per example.

Both ask the model to classify an example given only the explanation, so they work on any chat model,
need no logprobs and answer in one or two tokens (much cheaper than simulating every token):

- detection: is this text one on which the unit activates? Examples are the scoring records; a record
  is positive when the unit is active (> 0) on any of its tokens.
- fuzzing: in an activating record, are the <<marked>> tokens the ones the explanation is about? Each
  activating record is shown twice: with the tokens where the unit is active marked (correct), and with
  as many tokens where it is not active marked, drawn at random (incorrect).

A unit's score is the balanced accuracy (mean of the true-positive and true-negative rates) over its
examples: 0.5 is chance, 1 perfect, NaN when one class is missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .client import LLMClient
from .records import Record, UnitRecords
from .simulate import BadAnswer, chat_text, sampling_params

INTRO = ("We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
         "document. You are given an explanation of what a neuron looks for. ")
DETECTION_SYSTEM = INTRO + ("Say whether the neuron activates on the given text, that is whether the text contains "
                            "what the explanation describes. Answer with one word: yes or no.")
FUZZING_SYSTEM = INTRO + ("In the given text some tokens are marked <<like this>>. Say whether the marked tokens are "
                          "the ones the neuron activates on, as the explanation describes. Answer with one word: yes or no.")
EXAMPLE_EXPLANATION = "the word 'cat'"
DETECTION_EXAMPLES = [("the cat sat on the mat", "yes"), ("a dog ran in the park", "no")]
FUZZING_EXAMPLES = [("the <<cat>> sat on the mat", "yes"), ("the cat sat <<on>> the <<mat>>", "no")]


@dataclass(frozen=True)
class Example:
    scorer: str  # "detection" | "fuzzing"
    record: Record
    text: str
    label: bool


def mark(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    return "".join(f"<<{t}>>" if m else t for t, m in zip(tokens, marked))


def detection_examples(unit: UnitRecords, strings: Sequence[str]) -> list[Example]:
    return [Example("detection", r, "".join(strings[t] for t in r.tokens), max(r.acts) > 0) for r in unit.scoring]


def fuzzing_examples(unit: UnitRecords, strings: Sequence[str], seed: int) -> list[Example]:
    """Per activating scoring record, the correctly marked text and one with as many inactive tokens marked."""
    rng = np.random.default_rng([seed, unit.unit])
    examples = []
    for record in unit.scoring:
        active = np.asarray(record.acts) > 0
        if not active.any():
            continue
        tokens = [strings[t] for t in record.tokens]
        examples.append(Example("fuzzing", record, mark(tokens, active), True))
        inactive = np.flatnonzero(~active)
        if len(inactive):
            wrong = np.zeros(len(tokens), dtype=bool)
            wrong[rng.choice(inactive, size=min(int(active.sum()), len(inactive)), replace=False)] = True
            examples.append(Example("fuzzing", record, mark(tokens, wrong), False))
    return examples


def messages(scorer: str, explanation: str, text: str) -> list[dict]:
    system, shots = (DETECTION_SYSTEM, DETECTION_EXAMPLES) if scorer == "detection" else (FUZZING_SYSTEM, FUZZING_EXAMPLES)

    def ask(expl, txt):
        return f"Explanation: the main thing this neuron does is find {expl}.\nText: {json.dumps(txt, ensure_ascii=False)}"

    chat = [{"role": "system", "content": system}]
    for shot_text, answer in shots:
        chat += [{"role": "user", "content": ask(EXAMPLE_EXPLANATION, shot_text)}, {"role": "assistant", "content": answer}]
    return chat + [{"role": "user", "content": ask(explanation, text)}]


def parse_yes_no(text: str) -> bool:
    words = text.strip().lower().lstrip("\"'*` ").split()
    first = words[0].strip(".,!:;\"'*`") if words else ""
    if first in ("yes", "no"):
        return first == "yes"
    raise BadAnswer(f"expected yes or no, got {text[:40]!r}")


async def classify(client: LLMClient, example: Example, explanation: str, attempt: int = 0) -> bool:
    # Parsed before it is cached: an answer that is neither yes nor no is asked again on a rerun.
    return await client.chat(messages(example.scorer, explanation, example.text),
                             parse=lambda response: parse_yes_no(chat_text(response)), max_tokens=3, **sampling_params(attempt))


def balanced_accuracy(labels: Sequence[bool], answers: Sequence[bool]) -> float:
    labels, answers = np.asarray(labels, dtype=bool), np.asarray(answers, dtype=bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(((answers[labels]).mean() + (~answers[~labels]).mean()) / 2)
