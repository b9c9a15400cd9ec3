"""Autointerp logic that needs no endpoint: records, parsing, scoring, selection, ratings."""

import asyncio
import csv
import math
import re

import numpy as np
import pytest
from conftest import record_settings

from monoscope.autointerp.client import ClientConfig, LLMClient, ResponseCache, cache_key
from monoscope.autointerp.pipeline import AutointerpSettings, select_units
from monoscope.autointerp.prompts import UNKNOWN, all_at_once_prompt, clean_explanation, format_record
from monoscope.autointerp.ratings import export_sheet, ingest_ratings
from monoscope.autointerp.records import collect_records, quantise
from monoscope.autointerp.score import bootstrap_mean_ci, compare_dictionaries, correlation_scores
from monoscope.autointerp.simulate import BadAnswer, expected_value, parse_json_list, simulate_record
from monoscope.config import ConfigError, default_settings, validate_config


def random_blocks(n_blocks=5, b=8, context=16, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 50, (b, context)).astype(np.int32),
             np.maximum(rng.standard_normal((b, context, d)), 0).astype(np.float32)) for _ in range(n_blocks)]


def test_quantise_is_floor_of_ten_relu_over_max():
    assert quantise([-1.0, 0.0, 0.49, 0.5, 1.0, 2.0], 1.0) == [0, 0, 4, 5, 10, 10]
    assert quantise([0.0, 0.0], 0.0) == [0, 0]


def test_collect_records_keeps_the_true_top_sequences_and_splits_disjointly():
    blocks = random_blocks()
    tokens = np.concatenate([t for t, _ in blocks])
    acts = np.concatenate([a for _, a in blocks])
    records = collect_records(blocks, [1, 4], record_settings(n_top=6, n_explain=2, n_random=3, n_quantile=2, record_len=None, seed=1,
                              sampling="top_random_quantile"))
    for unit_records, unit in zip(records, [1, 4]):
        seq_max = acts[:, :, unit].max(axis=1)
        expected_top = set(np.argsort(-seq_max, kind="stable")[:6].tolist())
        top = [r for r in unit_records.explanation + unit_records.scoring if r.kind == "top"]
        assert {r.sequence for r in top} == expected_top
        assert unit_records.max_act == pytest.approx(float(acts[:, :, unit].max()))
        assert len(unit_records.explanation) == 2
        assert unit_records.explanation[0].acts == pytest.approx(acts[int(np.argmax(seq_max)), :, unit].tolist())
        sequences = [r.sequence for r in unit_records.explanation + unit_records.scoring]
        assert len(sequences) == len(set(sequences)), "a sequence is in both sets or twice"
        assert {r.kind for r in unit_records.scoring} == {"top", "random", "quantile"}
        for r in unit_records.scoring:
            assert r.tokens == tokens[r.sequence].tolist()


def test_bills_sampling_interleaves_top_records_and_scores_top_and_random_one_to_one():
    blocks = random_blocks(n_blocks=8)
    acts = np.concatenate([a for _, a in blocks])
    records = collect_records(blocks, [2, 5], record_settings(n_top=20, n_explain=5, n_random=8, record_len=None, seed=0))
    for unit_records, unit in zip(records, [2, 5]):
        ranked = np.argsort(-acts[:, :, unit].max(axis=1), kind="stable")[:20].tolist()
        assert [r.sequence for r in unit_records.explanation] == ranked[0::4]
        scored_top = [r.sequence for r in unit_records.scoring if r.kind == "top"]
        scored_random = [r.sequence for r in unit_records.scoring if r.kind == "random"]
        assert scored_top == ranked[2::4] and len(scored_random) == len(scored_top) == 5
        assert not set(scored_random) & set(ranked[0::4] + ranked[2::4])
        assert {r.kind for r in unit_records.scoring} == {"top", "random"}
    with pytest.raises(ValueError, match="sampling"):
        collect_records(blocks, [0], record_settings(sampling="delphi"))


def test_logit_weights_text_names_the_tokens_a_unit_raises_and_lowers(tmp_path):
    from monoscope.autointerp.pipeline import logit_weights_text

    np.savez(tmp_path / "weights.npz", logit_top_ids=np.array([[2, 0], [1, 2]]), logit_bottom_ids=np.array([[1, 1], [0, 0]]))
    text = logit_weights_text(tmp_path / "weights.npz", ["a", "b", "c"], n=2)
    assert text == {0: "raises: 'c', 'a' | lowers: 'b', 'b'", 1: "raises: 'b', 'c' | lowers: 'a', 'a'"}
    assert logit_weights_text(tmp_path / "missing.npz", ["a"]) == {}


def test_zeros_filtered_block_only_for_sparse_records():
    from monoscope.autointerp.prompts import explanation_messages

    sparse = [[("a", 0)] * 9 + [("b", 7)]]  # 10 % non-zero
    dense = [[("a", 1), ("b", 0), ("c", 3)]]
    assert "all zeros filtered out" in explanation_messages(sparse)[-1]["content"]
    assert "all zeros filtered out" not in explanation_messages(dense)[-1]["content"]
    assert explanation_messages(sparse)[-1]["content"].endswith("the main thing this neuron does is find")


def test_collect_records_cuts_windows_around_the_maximum_and_is_seeded():
    blocks = random_blocks()
    first = collect_records(blocks, [0], record_settings(n_top=4, n_explain=2, n_random=2, n_quantile=0, record_len=5, seed=3))
    again = collect_records(blocks, [0], record_settings(n_top=4, n_explain=2, n_random=2, n_quantile=0, record_len=5, seed=3))
    assert first == again
    for r in first[0].explanation:
        assert len(r.tokens) == len(r.acts) == 5
        assert max(r.acts) == pytest.approx(max(a for a in blocks[r.sequence // 8][1][r.sequence % 8, :, 0]))


def test_collect_records_rejects_bad_input():
    with pytest.raises(ValueError, match="n_explain"):
        collect_records(random_blocks(), [0], record_settings(n_top=2, n_explain=3))
    with pytest.raises(ValueError, match="out of range"):
        collect_records(random_blocks(d=3), [5], record_settings())
    with pytest.raises(ValueError, match="no activation blocks"):
        collect_records([], [0], record_settings())


def test_parse_json_list_accepts_lenient_separators_and_rejects_the_rest():
    assert parse_json_list("Sure: [0, 3 10]", 3) == [0.0, 3.0, 10.0]
    for text, reason in [("no list", "no JSON list"), ("[1, 2]", "2 values for 3"), ("[1, x, 2]", "other than"),
                         ("[1, 2, 11]", "outside")]:
        with pytest.raises(BadAnswer, match=reason):
            parse_json_list(text, 3)


def test_expected_value_normalises_over_number_tokens():
    assert expected_value({" 0": math.log(0.5), "10": math.log(0.5), "The": 0.0}) == pytest.approx(5.0)
    assert expected_value({"The": 0.0}) is None


def test_correlation_scores():
    assert correlation_scores([[1, 2], [3]], [[2, 4], [9]]) == {"spearman": pytest.approx(1), "pearson": pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 9])[0, 1])}
    assert correlation_scores([[1, 1, 1]], [[0, 1, 2]]) == {"spearman": 0.0, "pearson": 0.0}
    assert math.isnan(correlation_scores([[1, 2, 3]], [[1, 1, 1]])["spearman"])
    with pytest.raises(ValueError, match="simulated"):
        correlation_scores([[1, 2]], [[1, 2, 3]])


def test_bootstrap_ci_brackets_the_mean_and_comparison_reports_differences():
    ci = bootstrap_mean_ci([0.1, 0.2, 0.3, 0.4, float("nan")], n_boot=500, seed=0)
    assert ci["n"] == 4 and ci["mean"] == pytest.approx(0.25)
    assert ci["low"] < ci["mean"] < ci["high"]
    rows = lambda values: [{"spearman": v, "pearson": v, "status": "ok"} for v in values]  # noqa: E731
    summary = compare_dictionaries({"x8": rows([0.5, 0.6, 0.7]), "neurons": rows([0.1, 0.2]) + [
        {"spearman": math.nan, "pearson": math.nan, "status": "failed_bad_answer"}]}, n_boot=200, seed=0)
    assert summary["neurons"]["failed"] == 1
    assert summary["x8"]["spearman_minus_neurons"]["mean"] == pytest.approx(0.45)
    assert summary["x8"]["spearman_minus_neurons"]["low"] > 0


def test_select_units_takes_densest_then_random_live_units():
    density = np.array([0.0, 0.5, 0.1, 0.0, 0.3, 0.2, 0.05])
    units = select_units(density, n_units=3, n_top_density=2, seed=0)
    assert units[:2] == [1, 4]
    assert len(units) == 5 and len(set(units)) == 5 and not {0, 3} & set(units)
    assert select_units(density, 3, 2, 0) == units


def test_prompts_escape_tokens_and_locate_placeholders():
    assert format_record([("a\tb", 3), ("\n", 0)]) == "<start>\na\\tb\t3\n\\n\t0\n<end>\n"
    prompt, offsets = all_at_once_prompt("cats", [" the", " cat"])
    assert [prompt[o:o + 7] for o in offsets] == ["unknown", "unknown"]
    assert clean_explanation(" the main thing this neuron does is find cats. And more.") == "cats"


@pytest.mark.parametrize("section, key", [({"modle": "x"}, "'autointerp.modle'"),
                                          ({"simulation_method": "guess"}, "autointerp.simulation_method"),
                                          ({"scorers": ["vibes"]}, "autointerp.scorers"),
                                          ({"sampling": "best"}, "autointerp.sampling")])
def test_settings_reject_unknown_keys_and_methods_at_planning(section, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_config({"autointerp": section})


def test_cache_key_depends_on_model_and_body_and_cache_persists(tmp_path):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    url = "http://127.0.0.1:8000/v1"
    assert cache_key(url, "m", "chat", body) == cache_key(url, "m", "chat", dict(reversed(body.items())))
    assert cache_key(url, "m", "chat", body) != cache_key(url, "n", "chat", body)
    assert cache_key(url, "m", "chat", body) != cache_key(url, "m", "chat", body | {"max_tokens": 4})
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put("k", body, {"answer": 1})
    cache.close()
    assert ResponseCache(tmp_path / "c.sqlite").get("k") == {"answer": 1}


def test_client_needs_the_named_key_variable_for_remote_endpoints(tmp_path, monkeypatch):
    monkeypatch.delenv("MONOSCOPE_MISSING_KEY", raising=False)
    config = default_settings(ClientConfig, base_url="https://api.example.com/v1", model="m",
                              api_key_env="MONOSCOPE_MISSING_KEY", max_retries=0)

    async def call():
        async with LLMClient(config, tmp_path / "c.sqlite") as client:
            await client.chat([{"role": "user", "content": "hi"}])

    with pytest.raises(RuntimeError, match="MONOSCOPE_MISSING_KEY"):
        asyncio.run(call())


def test_rating_sheet_round_trip(tmp_path):
    items = [{"dictionary": name, "unit": u, "explanation": f"thing {u}", "examples": "[a]{3}b",
              "logit_weights": f"raises: 'tok{u}' | lowers: 'x'"} for name in ("x8", "neurons") for u in range(3)]
    with pytest.raises(ValueError, match="outside the raters' folder"):
        export_sheet(items, tmp_path / "out", tmp_path / "out" / "ratings_key.csv", seed=0)
    key_path = tmp_path / "ratings_key.csv"
    export_sheet(items, tmp_path / "out", key_path, seed=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rating_sheet.csv", "rating_sheet.html"]
    with open(tmp_path / "out" / "rating_sheet.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and "dictionary" not in rows[0], "the sheet must be blind"
    assert {r["logit_weights"] for r in rows} == {f"raises: 'tok{u}' | lowers: 'x'" for u in range(3)}
    form = (tmp_path / "out" / "rating_sheet.html").read_text()
    assert "Download filled CSV" in form and "raises: &#x27;tok1&#x27;" in form
    key = {r["item"]: r["dictionary"] for r in csv.DictReader(open(key_path))}
    filled = tmp_path / "filled"
    filled.mkdir()
    for row in rows:
        row.update(confidence="5" if key[row["item"]] == "x8" else "1", specificity="3")
    with open(filled / "alice.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    summary = ingest_ratings(filled, key_path)
    assert summary["dictionaries"]["x8"]["confidence"] == {"mean": 5.0, "n": 3}
    assert summary["dictionaries"]["neurons"]["confidence"]["mean"] == 1.0
    assert summary["dictionaries"]["neurons"]["logit_consistency"]["n"] == 0
    rows[0]["confidence"] = "7"
    with open(filled / "bob.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match="bob.csv:2: confidence must be an integer 1..5"):
        ingest_ratings(filled, key_path)


class PromptLogprobsEndpoint:
    """Answers a legacy completions request the way vLLM (prompt_logprobs) or an echo endpoint does: the
    prompt split into tokens at every placeholder, each placeholder's distribution over numbers set here."""

    def __init__(self, placeholder_distributions):
        self.placeholder_distributions = placeholder_distributions
        self.bodies = []

    async def request(self, kind, body, parse=None):
        self.bodies.append((kind, body))
        response = self._answer(body)
        return parse(response) if parse else response

    def _answer(self, body):
        prompt = body["prompt"]
        starts = [i + 1 for i in range(len(prompt)) if prompt.startswith(f"\t{UNKNOWN}\n", i)]  # a record's rows
        boundaries = sorted({0, *starts, *(s + len(UNKNOWN) for s in starts)})
        distributions = [{" the": -0.1}] * len(boundaries)
        for start, distribution in zip(starts, self.placeholder_distributions):
            distributions[boundaries.index(start)] = distribution
        choice = {"text": "", "logprobs": {"text_offset": boundaries}}
        if "prompt_logprobs" in body:  # vLLM: {token_id: {logprob, decoded_token}}, None for the first token
            choice["prompt_logprobs"] = [None] + [
                {str(i): {"logprob": lp, "decoded_token": tok} for i, (tok, lp) in enumerate(d.items())}
                for d in distributions[1:]]
        else:
            choice["logprobs"]["top_logprobs"] = distributions
        return {"choices": [choice]}


@pytest.mark.parametrize("method", ["prompt_logprobs", "echo"])
def test_all_at_once_simulation_reads_each_placeholders_distribution(method):
    prompt, offsets = all_at_once_prompt("loops", ["for", " x", " in"])
    assert [prompt[o - 1:o + len(UNKNOWN) + 1] for o in offsets] == [f"\t{UNKNOWN}\n"] * 3
    assert prompt.count(f"\t{UNKNOWN}\n") == 3  # only the placeholders, as the endpoint above assumes
    endpoint = PromptLogprobsEndpoint([
        {"10": 0.0},                                  # certain: 10
        {"2": math.log(0.5), " 4": math.log(0.5)},    # expected value 3, leading space ignored
        {"zero": 0.0},                                # no number: unparsed, predicted 0
    ])
    simulation = asyncio.run(simulate_record(endpoint, method, "loops", ["for", " x", " in"], top_logprobs=5))
    assert simulation.predicted == pytest.approx([10.0, 3.0, 0.0])
    assert simulation.unparsed == 1
    (kind, body), = endpoint.bodies
    assert kind == "completions" and body["echo"] is True and body["max_tokens"] == 1
    assert ("prompt_logprobs" in body) == (method == "prompt_logprobs")


def test_a_sheet_filled_for_an_earlier_key_is_never_attributed_to_other_units(tmp_path):
    first = [{"dictionary": "x8", "unit": u, "explanation": f"thing {u}", "examples": "e"} for u in range(4)]
    export_sheet(first, tmp_path / "one", tmp_path / "one_key.csv", seed=0)
    rows = list(csv.DictReader(open(tmp_path / "one" / "rating_sheet.csv", newline="")))
    by_item = {r["item"]: int(r["unit"]) for r in csv.DictReader(open(tmp_path / "one_key.csv"))}
    filled = tmp_path / "filled"
    filled.mkdir()
    with open(filled / "old.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerows({**r, "confidence": str(1 + by_item[r["item"]])} for r in rows)  # unit u rated u + 1
    # The next run: unit 1 is explained differently, unit 0 is gone, unit 9 is new; the order is reshuffled.
    second = [{"dictionary": "x8", "unit": u, "explanation": "other" if u == 1 else f"thing {u}", "examples": "e"}
              for u in (9, 3, 2, 1)]
    export_sheet(second, tmp_path / "two", tmp_path / "two_key.csv", seed=0)
    summary = ingest_ratings(filled, tmp_path / "two_key.csv")
    assert summary["stale_rows"] == {"old.csv": 2}  # units 0 and 1 (old explanation)
    assert summary["dictionaries"]["x8"]["confidence"] == {"mean": (3 + 4) / 2, "n": 2}  # units 2 and 3, as rated


def test_excel_byte_order_marks_and_header_spaces_are_read(tmp_path):
    items = [{"dictionary": "x8", "unit": u, "explanation": f"thing {u}", "examples": "e"} for u in range(2)]
    export_sheet(items, tmp_path / "out", tmp_path / "key.csv", seed=0)
    rows = list(csv.DictReader(open(tmp_path / "out" / "rating_sheet.csv", newline="")))
    filled = tmp_path / "filled"
    filled.mkdir()
    with open(filled / "excel.csv", "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow([" Item ", "Confidence "])
        writer.writerows([r["item"], "4"] for r in rows)
    summary = ingest_ratings(filled, tmp_path / "key.csv")
    assert summary["dictionaries"]["x8"]["confidence"] == {"mean": 4.0, "n": 2} and summary["stale_rows"] == {}


@pytest.mark.parametrize("text", ['=HYPERLINK("http://evil","x")', "+1+1", "-2", "@SUM(A1)", "\tx", "\rx"])
def test_explanations_that_look_like_formulas_are_written_as_text(tmp_path, text):
    export_sheet([{"dictionary": "x8", "unit": 0, "explanation": text, "examples": text, "logit_weights": text}],
                 tmp_path / "sheet", tmp_path / "key.csv", seed=0)
    (row,) = csv.DictReader(open(tmp_path / "sheet" / "rating_sheet.csv", newline=""))
    assert row["explanation"] == row["examples"] == row["logit_weights"] == "'" + text


class OracleChat:
    """A chat endpoint that knows unit 0 fires on ' cat': it explains, simulates (JSON) and answers
    detection and fuzzing questions the way a perfect model would."""

    def __init__(self):
        self.requests = []

    def redact(self, text):
        return text

    async def chat(self, messages, parse=None, **params):
        from monoscope.autointerp import classify, prompts

        self.requests.append((messages, params))
        system, last = messages[0]["content"], messages[-1]["content"]
        if system == prompts.EXPLAIN_SYSTEM:
            answer = " the word cat."
        elif system == prompts.SIMULATE_INTRO:
            import json as json_module

            tokens = json_module.loads(last.split("\n")[1].split(": ", 1)[1])
            answer = json_module.dumps([10 if t == " cat" else 0 for t in tokens])
        else:
            text = last.split("Text: ", 1)[1]
            if system == classify.DETECTION_SYSTEM:
                answer = "Yes." if "cat" in text else "no"
            else:
                marked = [part.split(">>")[0] for part in text.split("<<")[1:]]
                answer = "yes" if marked and all(m == " cat" for m in marked) else "No"
        response = {"choices": [{"message": {"content": answer}}]}
        return parse(response) if parse else response


def test_detection_and_fuzzing_score_a_perfect_explanation_one_and_cost_one_short_answer_per_example():
    from monoscope.autointerp.classify import balanced_accuracy, parse_yes_no
    from monoscope.autointerp.pipeline import interpret_units

    words = [" cat"] + [f" w{i}" for i in range(19)]
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(4):
        tokens = rng.integers(0, len(words), (16, 12)).astype(np.int32)
        blocks.append((tokens, ((tokens == 0) * 2.0)[..., None].astype(np.float32)))
    units = collect_records(blocks, [0], record_settings(n_top=12, n_explain=3, n_random=3, record_len=6, seed=0))
    client = OracleChat()
    settings = default_settings(AutointerpSettings)
    result, = asyncio.run(interpret_units(client, units, words, settings, "json"))
    assert result["status"] == "ok" and result["spearman"] == pytest.approx(1.0)
    assert result["detection"] == 1.0 and result["fuzzing"] == 1.0
    classifications = result["classifications"]
    assert {c["scorer"] for c in classifications} == {"detection", "fuzzing"}
    assert {c["label"] for c in classifications if c["scorer"] == "detection"} == {True, False}
    fuzz_labels = [c["label"] for c in classifications if c["scorer"] == "fuzzing"]
    assert fuzz_labels.count(True) == fuzz_labels.count(False) > 0
    yes_no = [params for messages, params in client.requests if "yes or no" in messages[0]["content"]]
    assert len(yes_no) == len(classifications) and all(p["max_tokens"] <= 3 for p in yes_no)
    assert balanced_accuracy([True, True, False, False], [True, True, True, True]) == 0.5
    assert np.isnan(balanced_accuracy([True, True], [True, False]))
    assert parse_yes_no(" **Yes**, it does") is True and parse_yes_no("no.") is False
    with pytest.raises(BadAnswer, match="yes or no"):
        parse_yes_no("maybe")
    only_detection = default_settings(AutointerpSettings, scorers=["detection"])
    result, = asyncio.run(interpret_units(OracleChat(), units, words, only_detection, "json"))
    assert result["status"] == "ok" and np.isnan(result["spearman"]) and "fuzzing" not in result
