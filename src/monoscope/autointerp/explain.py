"""Ask the endpoint for one short explanation of a unit from its explanation records."""

from __future__ import annotations

from collections.abc import Sequence

from .client import LLMClient
from .prompts import clean_explanation, explanation_messages
from .records import UnitRecords
from .simulate import BadAnswer, chat_text, sampling_params

MAX_EXPLANATION_CHARS = 300


def explanation_pairs(unit: UnitRecords, strings: Sequence[str]) -> list[list[tuple[str, int]]]:
    return [list(zip((strings[t] for t in r.tokens), unit.quantised(r))) for r in unit.explanation]


async def explain(client: LLMClient, unit: UnitRecords, strings: Sequence[str], *, max_tokens: int = 60,
                  attempt: int = 0) -> str:
    """One sentence; BadAnswer if the answer is empty or overlong after cleaning."""
    messages = explanation_messages(explanation_pairs(unit, strings))
    return await client.chat(messages, parse=parse_explanation, max_tokens=max_tokens, **sampling_params(attempt))


def parse_explanation(response: dict) -> str:
    """The cleaned one-sentence explanation; BadAnswer (and the answer is not cached) otherwise."""
    text = clean_explanation(chat_text(response))
    if not text:
        raise BadAnswer("empty explanation")
    if len(text) > MAX_EXPLANATION_CHARS:
        raise BadAnswer(f"explanation longer than {MAX_EXPLANATION_CHARS} characters")
    return text
