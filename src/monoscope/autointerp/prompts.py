"""Prompt text for explaining and simulating a unit, after Bills et al. 2023.

Records are shown as one ``token<TAB>activation`` line per token between ``<start>`` and ``<end>``,
activations quantised to 0..10. Each prompt has one hand-written worked example (few-shot) so that
even small models see the expected format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

EXPLAIN_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at the parts of the document the neuron activates for and summarize in a single "
    "sentence what the neuron is looking for. Don't list examples of words.\n\n"
    "The activation format is token<tab>activation. Activation values range from 0 to 10. A neuron "
    "finding what it's looking for is represented by a non-zero activation value. The higher the "
    "activation value, the stronger the match."
)

SIMULATE_INTRO = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at an explanation of what the neuron does, and try to predict its activations on "
    "each token.\n\nThe activation format is token<tab>activation, activations go from 0 to 10, "
    "\"unknown\" indicates an unknown activation. Most activations will be 0.\n"
)

UNKNOWN = "unknown"

# One worked example: (explanation, [(token, activation), ...]).
EXAMPLE_EXPLANATION = "vowels"
EXAMPLE_RECORDS = [
    [("a", 10), ("b", 0), ("c", 0)],
    [("d", 0), ("e", 10), ("f", 0)],
]
EXAMPLE_SIMULATION = [("the", 0), (" cat", 0), (" ate", 4), (" an", 3), (" apple", 9)]


def display_token(text: str) -> str:
    """Tabs and newlines would break the one-token-per-line format, so they are shown escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def format_record(pairs: Sequence[tuple[str, int | str]]) -> str:
    lines = "".join(f"{display_token(token)}\t{value}\n" for token, value in pairs)
    return f"<start>\n{lines}<end>\n"


REPEAT_NON_ZERO_BELOW = 0.2  # Bills repeat the non-zero activations only when fewer tokens than this are non-zero


def _non_zero(pairs: Sequence[tuple[str, int]]) -> str:
    """Bills repeat the non-zero activations after the records so the model need not search for them."""
    return "".join(f"{display_token(token)}\t{value}\n" for token, value in pairs if value)


def non_zero_fraction(records: Sequence[Sequence[tuple[str, int]]]) -> float:
    values = [value for record in records for _, value in record]
    return sum(1 for v in values if v) / max(1, len(values))


def explanation_messages(records: Sequence[Sequence[tuple[str, int]]], unit_label: str = "Neuron 1") -> list[dict]:
    """Chat messages asking for one explanation of ``records`` (each a list of (token, 0..10)). The
    "all zeros filtered out" repeat is added only when fewer than 20 % of the tokens are non-zero, as
    Bills et al. do: for a dense unit it would repeat most of the records."""
    def user(records_, label):
        body = "".join(format_record(r) for r in records_)
        repeat = ""
        if non_zero_fraction(records_) < REPEAT_NON_ZERO_BELOW:
            same = "".join(_non_zero(r) for r in records_)
            repeat = f"\nSame activations, but with all zeros filtered out:\n<start>\n{same}<end>\n"
        return (f"{label}\nActivations:\n{body}{repeat}\nExplanation of {label.lower()} behavior: the main thing "
                f"this neuron does is find")

    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": user(EXAMPLE_RECORDS, "Neuron 0")},
        {"role": "assistant", "content": f" {EXAMPLE_EXPLANATION}."},
        {"role": "user", "content": user(records, unit_label)},
    ]


def clean_explanation(text: str) -> str:
    """The first sentence of the answer, without the prompt's lead-in echoed back; '' if nothing usable."""
    text = " ".join(text.strip().split())
    lead = "the main thing this neuron does is find"
    if lead in text.lower():
        text = text[text.lower().index(lead) + len(lead):]
    text = text.strip(" :\"'")
    for stop in (". ", ".\n"):
        if stop in text:
            text = text[: text.index(stop)]
    return text.rstrip(".").strip()


def all_at_once_prompt(explanation: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
    """A completion prompt with every activation ``unknown``; returns it and the character offset of each
    placeholder, where the echoed prompt logprobs give the model's distribution over 0..10."""
    prompt = (SIMULATE_INTRO + f"\nNeuron 0\nExplanation of neuron 0 behavior: the main thing this neuron does "
              f"is find {EXAMPLE_EXPLANATION}\nActivations:\n" + format_record(EXAMPLE_SIMULATION)
              + f"\n\nNeuron 1\nExplanation of neuron 1 behavior: the main thing this neuron does is find "
              f"{explanation}\nActivations:\n<start>\n")
    offsets = []
    for token in tokens:
        prompt += f"{display_token(token)}\t"
        offsets.append(len(prompt))
        prompt += f"{UNKNOWN}\n"
    return prompt + "<end>\n", offsets


def json_messages(explanation: str, tokens: Sequence[str]) -> list[dict]:
    """Chat messages asking for a JSON list with one integer 0..10 per token."""
    def ask(expl, toks):
        return (f"Explanation of the neuron: the main thing this neuron does is find {expl}.\n"
                f"Tokens ({len(toks)}): {json.dumps(list(toks), ensure_ascii=False)}\n"
                f"Reply with only a JSON list of {len(toks)} integers from 0 to 10, one per token, "
                f"predicting the neuron's activation on each token.")

    example_tokens = [t for t, _ in EXAMPLE_SIMULATION]
    return [
        {"role": "system", "content": SIMULATE_INTRO},
        {"role": "user", "content": ask(EXAMPLE_EXPLANATION, example_tokens)},
        {"role": "assistant", "content": json.dumps([a for _, a in EXAMPLE_SIMULATION])},
        {"role": "user", "content": ask(explanation, tokens)},
    ]


def next_token_messages(explanation: str, tokens: Sequence[str], position: int) -> list[dict]:
    """Chat messages asking for the activation on one token; the answer's first-token logprobs are read."""
    def ask(expl, toks, pos):
        return (f"Explanation of the neuron: the main thing this neuron does is find {expl}.\n"
                f"Text: {json.dumps(''.join(toks), ensure_ascii=False)}\n"
                f"Token {pos + 1} of {len(toks)}: {json.dumps(toks[pos], ensure_ascii=False)}\n"
                f"Reply with one integer from 0 to 10: the neuron's activation on that token.")

    example_tokens = [t for t, _ in EXAMPLE_SIMULATION]
    return [
        {"role": "system", "content": SIMULATE_INTRO},
        {"role": "user", "content": ask(EXAMPLE_EXPLANATION, example_tokens, 4)},
        {"role": "assistant", "content": str(EXAMPLE_SIMULATION[4][1])},
        {"role": "user", "content": ask(explanation, tokens, position)},
    ]
