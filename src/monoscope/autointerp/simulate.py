"""Simulate a unit's activations from its explanation alone.

Methods (``autointerp.simulation_method``):

- ``prompt_logprobs``: one legacy-completions request per record with every activation written
  ``unknown``; vLLM's ``prompt_logprobs`` give the model's distribution over 0..10 at each placeholder
  (token positions from the echoed ``text_offset``).
- ``echo``: the same prompt, distributions from ``echo=True`` + ``logprobs`` (OpenAI legacy completions,
  vLLM).
- ``json``: any chat model; one request per record answering a JSON list of integers.
- ``next_token``: any chat model with ``top_logprobs``; one request per token, reading the distribution
  of the answer's first token.
- ``auto``: ``detect_method`` probes the endpoint.

Prediction from a distribution is Bills' expected value over the tokens "0".."10" among the top
logprobs, renormalised; a position with none of them predicts 0 and is counted as ``unparsed``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .client import BudgetExceeded, LLMClient, RequestFailed
from .prompts import all_at_once_prompt, json_messages, next_token_messages

METHODS = ("auto", "prompt_logprobs", "echo", "json", "next_token")
PROBE_TEXT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"
# How far the echoed logprob of the probe's last token may be from the next-token logprob of the same
# prefix (float32 kernels differ between batch and incremental evaluation by far less than this).
PROBE_TOLERANCE = 0.05


class BadAnswer(ValueError):
    """The endpoint answered, but not in a form we can use; the message says how."""


@dataclass(frozen=True)
class Simulation:
    predicted: list[float]
    unparsed: int  # positions whose top logprobs held no number 0..10 (predicted 0)


def expected_value(top_logprobs: dict[str, float]) -> float | None:
    weights = {}
    for token, logprob in top_logprobs.items():
        text = token.strip()
        if text.isdigit() and 0 <= int(text) <= 10:
            weights[int(text)] = weights.get(int(text), 0.0) + math.exp(logprob)
    total = sum(weights.values())
    return None if total == 0 else sum(v * w for v, w in weights.items()) / total


def _completion_choice(response: dict) -> dict:
    choices = response.get("choices") or []
    if not choices:
        raise BadAnswer("response has no choices")
    return choices[0]


def _positions(logprobs: dict, offsets: Sequence[int]) -> list[int]:
    text_offset = logprobs.get("text_offset") or []
    index = {offset: i for i, offset in enumerate(text_offset)}
    missing = [o for o in offsets if o not in index]
    if missing:
        raise BadAnswer(f"no token starts at {len(missing)} placeholder offset(s): tokenisation merged them")
    return [index[o] for o in offsets]


def _prompt_distributions(choice: dict, method: str) -> tuple[dict, list[dict | None]]:
    logprobs = choice.get("logprobs") or {}
    if method == "echo":
        return logprobs, list(logprobs.get("top_logprobs") or [])
    prompt = choice.get("prompt_logprobs")
    if not prompt:
        raise BadAnswer("no prompt_logprobs in the response")
    # vLLM: per prompt token, {token_id: {"logprob", "decoded_token", ...}} (None for the first token).
    return logprobs, [
        None if entry is None else {v.get("decoded_token", ""): v["logprob"] for v in entry.values()}
        for entry in prompt
    ]


def _prompt_request(method: str, prompt: str, top_logprobs: int) -> dict:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": top_logprobs}
    if method == "prompt_logprobs":
        body["prompt_logprobs"] = top_logprobs
    return body


async def simulate_record(client: LLMClient, method: str, explanation: str, tokens: Sequence[str], *,
                          top_logprobs: int, attempt: int = 0) -> Simulation:
    """Predict one record's activations (0..10 scale). Raises BadAnswer, RequestFailed or BudgetExceeded."""
    if method in ("echo", "prompt_logprobs"):
        prompt, offsets = all_at_once_prompt(explanation, tokens)
        def parse(response: dict) -> Simulation:
            logprobs, distributions = _prompt_distributions(_completion_choice(response), method)
            positions = _positions(logprobs, offsets)
            if max(positions) >= len(distributions):
                raise BadAnswer("fewer prompt logprobs than prompt tokens")
            return _from_distributions([distributions[p] or {} for p in positions])

        return await client.request("completions", _prompt_request(method, prompt, top_logprobs), parse)
    if method == "json":
        params = {"max_tokens": 8 + 4 * len(tokens)} | sampling_params(attempt)
        return await client.chat(json_messages(explanation, tokens),
                                 parse=lambda response: Simulation(parse_json_list(chat_text(response), len(tokens)), unparsed=0),
                                 **params)
    if method == "next_token":
        def parse(response: dict) -> dict[str, float]:
            content = (_completion_choice(response).get("logprobs") or {}).get("content") or []
            if not content:
                raise BadAnswer("chat response carries no logprobs: the endpoint does not offer top_logprobs")
            return {t["token"]: t["logprob"] for t in content[0].get("top_logprobs") or []}

        distributions = []
        for position in range(len(tokens)):
            distributions.append(await client.chat(next_token_messages(explanation, tokens, position), parse=parse,
                                                   max_tokens=1, logprobs=True, top_logprobs=min(top_logprobs, 20),
                                                   **sampling_params(attempt)))
        return _from_distributions(distributions)
    raise ValueError(f"unknown simulation method {method!r}; expected one of {METHODS[1:]}")


def sampling_params(attempt: int) -> dict:
    """Greedy first; a retry after a bad answer must be a different request (else the cache repeats it)."""
    return {"temperature": 0} if attempt == 0 else {"temperature": 0.7, "seed": attempt}


def _from_distributions(distributions: Sequence[dict]) -> Simulation:
    values = [expected_value(d) for d in distributions]
    return Simulation([0.0 if v is None else v for v in values], unparsed=sum(v is None for v in values))


def chat_text(response: dict) -> str:
    message = _completion_choice(response).get("message") or {}
    text = (message.get("content") or "").strip()
    if not text:
        raise BadAnswer("empty answer")
    return text


_LIST = re.compile(r"\[[^\[\]]*\]")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def parse_json_list(text: str, length: int) -> list[float]:
    """The first ``[...]`` in ``text`` as ``length`` numbers in 0..10, else BadAnswer saying what is wrong.

    Separators are taken leniently (commas and/or spaces): small models often drop a comma."""
    match = _LIST.search(text)
    if match is None:
        raise BadAnswer(f"no JSON list in answer {text[:80]!r}")
    items = [item.strip() for item in match.group(0)[1:-1].replace(",", " ").split()]
    if not all(_NUMBER.fullmatch(item) for item in items):
        raise BadAnswer(f"list holds something other than numbers: {match.group(0)[:80]!r}")
    values = [float(item) for item in items]
    if len(values) != length:
        raise BadAnswer(f"list has {len(values)} values for {length} tokens")
    if any(not 0 <= v <= 10 for v in values):
        raise BadAnswer("value outside 0..10")
    return [float(v) for v in values]


async def _echo_consistent(client: LLMClient, method: str, top_logprobs: int) -> tuple[bool, str]:
    """Do the prompt logprobs agree with next-token logprobs for the same prefix?

    The echoed distribution at the probe's last token must equal the distribution the endpoint gives
    when asked for the next token after the text before it (same top token, and the last token's
    logprob within PROBE_TOLERANCE). llama-cpp-python's echo logprobs fail this (they are misaligned),
    which is why they cannot be trusted just because they are present.
    """
    response = await client.request("completions", _prompt_request(method, PROBE_TEXT, top_logprobs))
    logprobs, distributions = _prompt_distributions(_completion_choice(response), method)
    tokens, offsets = logprobs.get("tokens") or [], logprobs.get("text_offset") or []
    if len(tokens) < 2 or len(offsets) != len(tokens) or len(distributions) < len(tokens):
        return False, "no per-token prompt logprobs in the response"
    last, echoed = tokens[len(tokens) - 1], distributions[len(tokens) - 1] or {}
    reference = await client.complete(PROBE_TEXT[: offsets[-1]], max_tokens=1, temperature=0, logprobs=top_logprobs)
    ref_logprobs = (_completion_choice(reference).get("logprobs") or {}).get("top_logprobs") or [None]
    expected = ref_logprobs[0] or {}
    if not echoed or not expected:
        return False, "no top logprobs to compare"
    if max(echoed, key=echoed.get) != max(expected, key=expected.get):
        return False, (f"echoed top token {max(echoed, key=echoed.get)!r} differs from next-token top "
                       f"{max(expected, key=expected.get)!r}")
    if last in expected and last in echoed and abs(expected[last] - echoed[last]) > PROBE_TOLERANCE:
        return False, f"echoed logprob of {last!r} differs from the next-token logprob by more than {PROBE_TOLERANCE}"
    return True, "prompt logprobs agree with next-token logprobs"


async def detect_method(client: LLMClient, top_logprobs: int) -> tuple[str, dict[str, str]]:
    """Probe the endpoint (cached, so free on reruns): the first trustworthy method, and why each was or not."""
    notes = {}
    for method in ("prompt_logprobs", "echo"):
        try:
            ok, why = await _echo_consistent(client, method, top_logprobs)
        except (BadAnswer, RequestFailed) as error:
            ok, why = False, f"probe failed: {error}"
        except BudgetExceeded:
            raise
        notes[method] = why
        if ok:
            return method, notes
    notes["json"] = "chat fallback: one request per record"
    return "json", notes
