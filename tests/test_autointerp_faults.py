"""The autointerp client and pipeline against hostile endpoints, through the fault proxy's own stub
server (no LLM needed): cache keys, Retry-After, odd answers failing one unit, answers that do not
parse never cached, a locked cache, and secrets kept out of every output and log."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time

import numpy as np
import pytest
from conftest import record_settings
from fault_proxy import FaultProxy

from monoscope.autointerp import client as client_module
from monoscope.autointerp.client import ClientConfig, LLMClient, ResponseCache, cache_key, job_cache_path, redact, redact_url
from monoscope.autointerp.pipeline import AutointerpSettings, _run, write_results
from monoscope.autointerp.records import collect_records
from monoscope.config import ConfigError, default_settings, validate_config

WORDS = "the cat sat on a mat and dog ran to red blue green house tree big".split()
STRINGS = [" " + w for w in WORDS]
SECRET = "sk-live-monoscope-0123456789abcdef"
URL_PASSWORD = "hunter2-url-password"
# Explanations and JSON simulations both accept this answer (records are 4 tokens long).
ANSWER = "[1, 2, 3, 4]"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def units():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(WORDS), (16, 12)).astype(np.int32)
    acts = np.zeros((16, 12, 4), np.float32)
    for unit, word in enumerate((1, 10, 0, 5)):
        acts[..., unit] = (tokens == word) * (1.0 + unit) + rng.uniform(0, 0.1, tokens.shape)
    return collect_records([(tokens, acts)], [0, 1, 2, 3], record_settings(n_top=3, n_explain=2, n_random=1, n_quantile=0, record_len=4, seed=0))


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("MONOSCOPE_TEST_KEY", SECRET)


def settings(base_url, tmp_path, **overrides):
    values = dict(base_url=base_url, model="stub", api_key_env="MONOSCOPE_TEST_KEY", simulation_method="json",
                  cache_path=str(tmp_path / "cache.sqlite"), concurrency=2, max_retries=2, backoff_s=0.01,
                  backoff_max_s=0.05, bad_answer_retries=0, seed=0,
                  scorers=("simulation",))  # the stub's one answer is a JSON list, not a yes/no
    return default_settings(AutointerpSettings, **(values | overrides))


def run(units, settings):
    return asyncio.run(_run(units, STRINGS, settings))


def client_config(**values) -> ClientConfig:
    return default_settings(ClientConfig, **values)


def chat_once(config: ClientConfig, cache_path, **params):
    async def go():
        async with LLMClient(config, cache_path) as client:
            response = await client.chat(MESSAGES, **params)
            return response, client.usage_dict()

    return asyncio.run(go())


def test_the_cache_key_holds_the_server(tmp_path):
    body = {"messages": MESSAGES}
    assert cache_key("http://a:1/v1", "m", "chat", body) != cache_key("http://b:1/v1", "m", "chat", body)
    assert cache_key("http://a:1/v1", "m", "chat", body) == cache_key("http://a:1/v1/", "m", "chat", body)
    assert cache_key("http://u:old@a:1/v1", "m", "chat", body) == cache_key("http://u:new@a:1/v1", "m", "chat", body)
    with FaultProxy(None, stub_content="first") as first, FaultProxy(None, stub_content="second") as second:
        cache = tmp_path / "c.sqlite"
        one, _ = chat_once(client_config(base_url=first.url + "/v1", model="same-name", api_key_env="MONOSCOPE_TEST_KEY"), cache)
        two, usage = chat_once(client_config(base_url=second.url + "/v1", model="same-name", api_key_env="MONOSCOPE_TEST_KEY"), cache)
        again, usage_again = chat_once(client_config(base_url=second.url + "/v1", model="same-name", api_key_env="MONOSCOPE_TEST_KEY"), cache)
    assert one["choices"][0]["message"]["content"] == "first" and two["choices"][0]["message"]["content"] == "second"
    assert usage["requests"] == 1 and usage_again["requests"] == 0 and again == two


@pytest.mark.parametrize("fault", ["429_inf", "429_date", "429_huge"])
def test_retry_after_is_capped(tmp_path, fault):
    with FaultProxy(None, sequence=[fault, fault]) as proxy:
        started = time.monotonic()
        _, usage = chat_once(client_config(base_url=proxy.url + "/v1", model="m", api_key_env="MONOSCOPE_TEST_KEY", backoff_max_s=0.1, max_retries=3),
                             tmp_path / "c.sqlite")
    assert time.monotonic() - started < 5 and usage["retries"] == 2 and usage["answered"] == 1


@pytest.mark.parametrize("fault", ["odd_usage", "no_choices", "null_message", "not_json", "echo_secrets"])
def test_an_odd_answer_fails_one_unit_and_the_others_are_scored(tmp_path, units, fault):
    # One faulty answer, no retries: exactly the unit whose request got it fails, with a reason.
    with FaultProxy(None, sequence=[fault], stub_content=ANSWER) as proxy:
        results, usage = run(units, settings(proxy.url + "/v1", tmp_path, max_retries=0))
    statuses = [r["status"] for r in results]
    if fault == "odd_usage":  # a usable answer with nonsense counts: counted as 0, the unit is scored
        assert statuses == ["ok"] * 4 and usage["prompt_tokens"] == usage["requests"] - 1
    else:
        failed = [r for r in results if r["status"] != "ok"]
        assert len(failed) == 1 and failed[0]["status"].startswith("failed_") and failed[0]["reason"]


def test_an_answer_that_does_not_parse_is_not_cached(tmp_path, units):
    with FaultProxy(None, stub_content="no list here") as proxy:
        bad, _ = run(units, settings(proxy.url + "/v1", tmp_path))
        assert {r["status"] for r in bad} == {"failed_bad_answer"}
        proxy.stub_content = ANSWER
        good, usage = run(units, settings(proxy.url + "/v1", tmp_path))
        rerun, rerun_usage = run(units, settings(proxy.url + "/v1", tmp_path))
    # The explanations ("no list here") parsed and were kept; the simulations did not and are asked again.
    assert [r["status"] for r in good] == ["ok"] * 4 and usage["requests"] == sum(len(u.scoring) for u in units)
    assert rerun == good and rerun_usage["requests"] == 0


def test_a_locked_cache_costs_requests_not_units(tmp_path, units, monkeypatch):
    def locked(self, *args):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(ResponseCache, "put", locked)
    monkeypatch.setattr(ResponseCache, "get", locked)
    with FaultProxy(None, stub_content=ANSWER) as proxy:
        results, usage = run(units, settings(proxy.url + "/v1", tmp_path))
    assert [r["status"] for r in results] == ["ok"] * 4 and usage["errors"]["cache"] > 0


def test_each_job_writes_its_own_cache_file_in_rollback_journal_mode(tmp_path):
    paths = {job_cache_path(tmp_path / "responses.sqlite", name) for name in ("neurons", "x8_l1-3.75")}
    assert paths == {tmp_path / "responses-neurons.sqlite", tmp_path / "responses-x8_l1-3.75.sqlite"}
    cache = ResponseCache(tmp_path / "responses-neurons.sqlite")
    assert cache._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    cache.close()


def test_secrets_reach_no_output_and_no_log(tmp_path, units, caplog):
    with FaultProxy(None, sequence=["echo_secrets"] * 6, stub_content=ANSWER) as proxy:
        base_url = proxy.url.replace("http://", f"http://monoscope:{URL_PASSWORD}@") + "/v1?api-key=" + URL_PASSWORD
        with caplog.at_level(logging.DEBUG):
            results, usage = run(units, settings(base_url, tmp_path, concurrency=1, max_retries=1))
    assert results[0]["status"] == "failed_request_failed" and "invalid credentials" in results[0]["reason"]
    write_results(results, usage, tmp_path / "out")
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir())
    written += caplog.text + json.dumps(results) + json.dumps(usage)
    written += "".join(r.decode("utf-8", "replace") for r in (tmp_path / "cache.sqlite").read_bytes().split(b"\0"))
    assert SECRET not in written and URL_PASSWORD not in written
    assert usage["base_url"] == proxy.url + "/v1?api-key=***"


@pytest.mark.parametrize("text, secret", [
    ("GET https://user:pa55word@host/v1 failed", "pa55word"),
    ("401: Incorrect API key provided: sk-proj-AbCdEf0123456789", "sk-proj-AbCdEf0123456789"),
    ("header Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
    ("url http://h/v1?key=zzz-secret-zzz&x=1", "zzz-secret-zzz"),
    ("echo hf_AbCdEfGhIjKlMn", "hf_AbCdEfGhIjKlMn"),
])
def test_redaction_removes_each_kind_of_secret(text, secret):
    assert secret not in redact(text)
    assert redact_url("https://u:p@host:8/v1") == "https://host:8/v1"


@pytest.mark.parametrize("pasted", [SECRET, "sk-abc def", "Bearer 123456", "my-key-here"])
def test_a_key_pasted_into_api_key_env_is_never_echoed(tmp_path, pasted):
    with pytest.raises(ConfigError, match="api_key_env") as error:
        validate_config({"autointerp": {"api_key_env": pasted}})
    assert pasted not in str(error.value)
    config = client_config(base_url="https://api.example.com/v1", model="m", api_key_env=pasted, max_retries=0)
    with pytest.raises(RuntimeError, match="api_key_env") as error:
        chat_once(config, tmp_path / "c.sqlite")
    assert pasted not in str(error.value)


def test_retry_after_parsing():
    class Response:
        def __init__(self, value):
            self.headers = {"retry-after": value}

    class Error:
        def __init__(self, value):
            self.response = Response(value)

    for value in ("inf", "-inf", "nan", "-5", "soon", "Fri, 31 Dec 1999 23:59:59 GMT"):
        assert client_module._retry_after(Error(value)) is None
    assert client_module._retry_after(Error("2.5")) == 2.5
    assert client_module._retry_after(Error("Fri, 31 Dec 2100 23:59:59 GMT")) > 1e9  # then capped by the client
