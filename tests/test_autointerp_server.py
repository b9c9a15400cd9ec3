"""Autointerp mechanics against a real local OpenAI-compatible server (llama.cpp + SmolLM2-135M).

The model is far too small for good explanations: these tests check requests, parsing, scores, cache,
fault handling and secrets, not quality.
"""

import asyncio
import json
import logging
import math

import numpy as np
import pytest
from conftest import record_settings
from fault_proxy import FaultProxy

from monoscope.autointerp.client import LLMClient
from monoscope.autointerp.pipeline import AutointerpSettings, _run, read_scores, run_comparison, write_results
from monoscope.autointerp.records import collect_records
from monoscope.autointerp.simulate import detect_method
from monoscope.config import default_settings

pytest_plugins = ["llm_server"]

WORDS = "the cat sat on a mat and dog ran to red blue green house tree big".split()
STRINGS = [" " + w for w in WORDS]
SECRET = "sk-monoscope-test-secret-0123456789"


@pytest.fixture(scope="module")
def unit_records():
    """Three synthetic units ('cat', colours, 'the'): 2 explanation + 2 scoring records of 4 tokens each."""
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(3):
        tokens = rng.integers(0, len(WORDS), (16, 12)).astype(np.int32)
        acts = np.zeros((16, 12, 3), np.float32)
        acts[..., 0] = (tokens == 1) * 3.0
        acts[..., 1] = np.isin(tokens, [10, 11, 12]) * rng.uniform(1, 2, tokens.shape)
        acts[..., 2] = (tokens == 0) * 1.0
        blocks.append((tokens, acts))
    return collect_records(blocks, [0, 1, 2], record_settings(n_top=3, n_explain=2, n_random=1, n_quantile=0, record_len=4, seed=0,
                           sampling="top_random_quantile"))


def settings_for(base_url, tmp_path, **overrides):
    values = dict(base_url=base_url, model="smollm2-135m", api_key_env="MONOSCOPE_TEST_KEY",
                  simulation_method="next_token", cache_path=str(tmp_path / "cache.sqlite"), concurrency=4,
                  backoff_s=0.01, backoff_max_s=0.05, explanation_max_tokens=16, top_logprobs=10, seed=0,
                  scorers=("simulation",))  # detection and fuzzing have their own test below
    return default_settings(AutointerpSettings, **(values | overrides))


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("MONOSCOPE_TEST_KEY", SECRET)


def run(records, settings):
    return asyncio.run(_run(records, STRINGS, settings))


def test_detection_rejects_llama_cpp_echo_logprobs_and_falls_back_to_chat(llm_base_url, tmp_path):
    async def detect():
        async with LLMClient(settings_for(llm_base_url, tmp_path).client_config(), tmp_path / "c.sqlite") as client:
            return await detect_method(client, 10)

    method, notes = asyncio.run(detect())
    assert method == "json"
    assert "differs" in notes["echo"] or "no per-token" in notes["echo"]
    assert "prompt_logprobs" in notes


def test_scores_every_unit_then_rerun_sends_no_request_and_key_is_never_written(
        llm_base_url, tmp_path, unit_records, caplog):
    caplog.set_level(logging.DEBUG)
    settings = settings_for(llm_base_url, tmp_path)
    results, usage = run(unit_records, settings)
    assert [r["status"] for r in results] == ["ok"] * 3, [r.get("reason") for r in results]
    for r in results:
        assert r["explanation"] and len(r["simulations"]) == 2
        assert all(len(s["predicted"]) == 4 and all(0 <= p <= 10 for p in s["predicted"]) for s in r["simulations"])
        assert -1 <= r["spearman"] <= 1 and -1 <= r["pearson"] <= 1
    # 3 explanations + 3 units x 2 records x 4 tokens, one request each
    assert usage["answered"] == 3 + 3 * 2 * 4 and usage["failures"] == 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0

    again, usage_again = run(unit_records, settings)
    assert usage_again["requests"] == 0 and usage_again["cache_hits"] == usage["answered"]
    assert again == results

    write_results(results, usage, tmp_path / "out")
    written = [tmp_path / "cache.sqlite", *sorted((tmp_path / "out").iterdir())]
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text
    scores = read_scores(tmp_path / "out" / "scores.csv")
    assert [s["status"] for s in scores] == ["ok"] * 3


def test_json_simulation_ends_every_unit_with_a_score_or_a_reason(llm_base_url, tmp_path, unit_records):
    # SmolLM2-135M often writes a list of the wrong length: such units must fail cleanly, with a reason.
    results, usage = run(unit_records, settings_for(llm_base_url, tmp_path, simulation_method="json",
                                                    bad_answer_retries=1))
    for r in results:
        assert r["status"] in ("ok", "failed_bad_answer")
        if r["status"] == "ok":
            assert all(len(s["predicted"]) == 4 for s in r["simulations"])
        else:
            assert r["reason"].startswith("simulate:") and "after 2 attempts" in r["reason"]
    assert usage["answered"] >= 3 + 3 * 2


def test_detection_and_fuzzing_get_one_word_answers_from_a_small_chat_model(llm_base_url, tmp_path, unit_records):
    results, usage = run(unit_records, settings_for(llm_base_url, tmp_path, scorers=("detection", "fuzzing"),
                                                    bad_answer_retries=1))
    for r in results:
        assert r["status"] in ("ok", "failed_bad_answer"), r.get("reason")
        if r["status"] == "ok":
            assert r["classifications"] and all(isinstance(c["answer"], bool) for c in r["classifications"])
            assert not r["simulations"] and math.isnan(r["spearman"])
        else:
            assert r["reason"].startswith("classify:")
    assert any(r["status"] == "ok" for r in results)


def test_empty_answers_are_retried_then_recorded_as_failures(llm_base_url, tmp_path, unit_records):
    root = llm_base_url.removesuffix("/v1")
    with FaultProxy(root, p_empty=1.0) as proxy:
        results, usage = run(unit_records, settings_for(proxy.url + "/v1", tmp_path, bad_answer_retries=2))
    assert [r["status"] for r in results] == ["failed_bad_answer"] * 3
    assert all(r["reason"] == "explain: empty answer (after 3 attempts)" for r in results)
    assert usage["answered"] == proxy.counts.emptied == 3 * 3  # each retry is a new request (new seed)


def test_budget_exhaustion_fails_units_without_losing_others(llm_base_url, tmp_path, unit_records):
    results, usage = run(unit_records, settings_for(llm_base_url, tmp_path, max_requests=6, concurrency=1))
    assert usage["requests"] == 6
    assert {r["status"] for r in results} <= {"ok", "failed_budget"}
    assert any(r["status"] == "failed_budget" and "budget of 6" in r["reason"] for r in results)


def test_faults_end_in_scores_or_failures_and_answered_requests_are_kept(llm_base_url, tmp_path, unit_records):
    root = llm_base_url.removesuffix("/v1")
    with FaultProxy(root, p_429=0.2, p_500=0.15, p_truncate=0.15, seed=1) as proxy:
        results, usage = run(unit_records, settings_for(proxy.url + "/v1", tmp_path, max_retries=2))
        assert proxy.counts.status_429 and proxy.counts.status_500 and proxy.counts.truncated
        assert usage["retries"] > 0 and set(usage["errors"]) >= {"429", "500"}
        assert all(r["status"] == "ok" or r["status"].startswith("failed_") and r["reason"] for r in results)

        # Without faults, the rerun (same endpoint: the server is part of the cache key) sends only
        # what the faulty run never got answered.
        proxy.p_429 = proxy.p_500 = proxy.p_truncate = 0.0
        clean, clean_usage = run(unit_records, settings_for(proxy.url + "/v1", tmp_path))
    assert [r["status"] for r in clean] == ["ok"] * 3
    assert clean_usage["requests"] == 3 + 3 * 2 * 4 - usage["answered"]
    for before, after in zip(results, clean):
        if before["status"] == "ok":
            assert before == after


def test_comparison_writes_cis_plot_sheet_and_ingests_filled_sheets(llm_base_url, tmp_path, unit_records):
    settings = settings_for(llm_base_url, tmp_path)
    comparison = {"bootstrap_samples": 200, "seed": 0, "ratings_dir": tmp_path / "filled"}
    results, usage = run(unit_records, settings)
    for name in ("x8", "neurons"):
        write_results(results, usage, tmp_path / name)
    dirs = {"x8": tmp_path / "x8", "neurons": tmp_path / "neurons"}
    summary = run_comparison(dirs, tmp_path / "comparison.json", tmp_path / "comparison.png", tmp_path / "ratings",
                             **comparison)
    assert summary["scores"]["x8"]["scored"] == 3
    assert summary["scores"]["x8"]["spearman_minus_neurons"]["mean"] == pytest.approx(0.0)
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["human_ratings"]["dictionaries"] == {}

    sheet = (tmp_path / "ratings" / "rating_sheet.csv").read_text().splitlines()
    (tmp_path / "filled").mkdir()
    first = sheet[1]
    item = first.split(",")[0]
    (tmp_path / "filled" / "rater.csv").write_text(f"item,confidence,specificity\n{item},4,2\n")
    summary = run_comparison(dirs, tmp_path / "comparison.json", tmp_path / "comparison.png", tmp_path / "ratings",
                             **comparison)
    rated = json.loads((tmp_path / "comparison.json").read_text())["human_ratings"]["dictionaries"]
    assert sum(d["confidence"]["n"] for d in rated.values()) == 1
    assert [d["confidence"]["mean"] for d in rated.values()] == [4.0]
    assert not math.isnan(summary["scores"]["neurons"]["spearman"]["mean"])
