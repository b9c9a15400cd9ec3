"""The feature browser and the interactive neuroscope in a real headless Chromium (Debian's, via Selenium).

scripts/setup.d/chromium.sh installs chromium, chromium-driver and selenium.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_MODEL, open_page, tiny_feature_settings
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from monoscope import features, models, pretrained, sae, site, tokenize
from monoscope.layout import Layout
from monoscope.probes import DEFAULT_CONCEPTS

SCRIPT_TOKEN = "<script>window.PWNED=1</script>"
ATTRIBUTE_TOKEN = '"onload=window.PWNED=2 x="'
EXPLANATION = '<img src=x onerror="window.PWNED=3"> & "quotes"'


@pytest.fixture(scope="module")
def results(tiny_results, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser") / "results"
    shutil.copytree(tiny_results[0], root)
    (root / "autointerp" / "x2").mkdir(parents=True)
    (root / "autointerp" / "x2" / "scores.csv").write_text(
        "unit,status,spearman,pearson,n_tokens,unparsed,explanation,reason\n"
        f'0,ok,0.61,0.5,40,0,"{EXPLANATION.replace(chr(34), chr(34) * 2)}",\n')
    # Hostile display strings on the tokens at the centre of feature 0's top two examples.
    examples = features.load_features(root / "features" / "x2")["examples"]
    context = tiny_feature_settings().context_tokens
    script_id, attribute_id = (int(t) for t in examples["top_tokens"][0, :2, context])
    strings = tokenize.token_strings(root / "tokenizer")
    strings[script_id] = SCRIPT_TOKEN
    if attribute_id != script_id:
        strings[attribute_id] = ATTRIBUTE_TOKEN
    site.build_site(Layout(root), ["x2", "neurons"], strings, root / "report" / "browser", live_threshold=1e-4)
    return root


def test_index_pages_load_and_show_the_concept_table(results, browser, tmp_path):
    browser_dir = results / "report" / "browser"
    open_page(browser, (browser_dir / "index.html").as_uri(), ready=False)
    rows = browser.find_elements(By.CSS_SELECTOR, "#concept-table tr")
    assert len(rows) == 1 + len(DEFAULT_CONCEPTS)  # the tiny settings keep the built-in concepts
    assert browser.find_element(By.LINK_TEXT, "x2").get_attribute("href").endswith("x2/index.html")
    assert browser.find_element(By.CSS_SELECTOR, 'img[src="x2/rare_features.png"]').get_property("naturalWidth") > 0
    browser.save_screenshot(str(tmp_path / "index.png"))
    assert (tmp_path / "index.png").stat().st_size > 5000

    open_page(browser, (browser_dir / "x2" / "index.html").as_uri())
    header = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#units th")]
    assert {"density", "max act", "autointerp", "best concept AUROC"} <= set(header)
    density_column = header.index("density")

    def column(index):
        cells = browser.find_elements(By.CSS_SELECTOR, f"#units tbody tr td:nth-child({index + 1})")
        return [float(c.text) if c.text != "–" else -np.inf for c in cells]

    assert len(column(0)) == 96
    densities = column(density_column)
    assert densities == sorted(densities, reverse=True)
    browser.find_element(By.CSS_SELECTOR, 'th[data-column="density"]').click()  # sorted again: ascending
    assert column(density_column) == sorted(densities)
    browser.find_element(By.CSS_SELECTOR, 'th[data-column="autointerp"]').click()
    assert column(0)[0] == 0  # the only scored unit comes first


def test_unit_page_renders_data_as_text(results, browser, tmp_path):
    open_page(browser, (results / "report" / "browser" / "x2" / "unit.html").as_uri() + "#0")
    assert browser.execute_script("return window.PWNED") is None
    tokens = [span.get_property("textContent") for span in browser.find_elements(By.CSS_SELECTOR, "#top-examples .tok.centre")]
    assert tokens[0] == SCRIPT_TOKEN
    assert ATTRIBUTE_TOKEN in tokens or tokens[1] == SCRIPT_TOKEN
    assert browser.find_element(By.CSS_SELECTOR, "#explanation q").get_property("textContent") == EXPLANATION
    assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram div")) == tiny_feature_settings().histogram_bins
    browser.save_screenshot(str(tmp_path / "unit.png"))

    neuron_link = browser.find_element(By.CSS_SELECTOR, ".links a")  # feature -> the neurons it draws on
    neuron = int(neuron_link.text.split()[-1])
    neuron_link.click()
    WebDriverWait(browser, 10).until(lambda d: d.title == f"neurons neuron {neuron}")
    assert browser.find_elements(By.CSS_SELECTOR, ".links a")[0].text.startswith("x2 #")  # and back to features
    assert browser.find_elements(By.CSS_SELECTOR, "#top-examples .example")


def free_server(results: Path, config_path: Path):
    process = subprocess.Popen(
        [sys.executable, "-m", "monoscope.cli", "serve", "--results", str(results), "--dictionary", "x2",
         "--config", str(config_path), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    for line in process.stdout:
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        if match:
            return process, match.group(0)
        assert time.monotonic() < deadline, "monoscope serve did not start"
    raise AssertionError(f"monoscope serve exited with {process.wait()} before serving")


def test_interactive_neuroscope_returns_activations_for_typed_text(results, browser, tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"model": TINY_MODEL}))
    process, url = free_server(results, config_path)
    try:
        open_page(browser, url, ready=False)
        text = "class Point:\n    def norm(self):\n        return 42  # done\n"
        area = browser.find_element(By.ID, "text")
        area.clear()
        area.send_keys(text)
        unit = browser.find_element(By.ID, "unit")
        unit.clear()
        unit.send_keys("5")
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        spans = browser.find_elements(By.CSS_SELECTOR, "#result .tok")
        shown = [float(s.get_attribute("title")) for s in spans]
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        browser.save_screenshot(str(tmp_path / "serve.png"))

        tokenizer = tokenize.load_tokenizer(results / "tokenizer")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > 32  # longer than the tiny model's context: the app shows the first 32 tokens and says so
        assert "first 32 tokens" in browser.find_element(By.ID, "status").text
        ids = ids[:32]
        with torch.no_grad():
            bridge = models.load_native(results / "model")
            acts = pretrained.run_to_hook(bridge, torch.tensor([ids]), "blocks.0.mlp.hook_post")
            expected = sae.load_sae(results / "sae" / "x2").encode(acts)[0, :, 5].numpy()
        strings = tokenize.token_strings(results / "tokenizer")
        assert "".join(s.get_property("textContent") for s in spans) == "".join(strings[t] for t in ids).replace("\n", "⏎")
        np.testing.assert_allclose(shown, expected, rtol=2e-2, atol=2e-3)  # titles show 3 significant digits

        request = urllib.request.Request(url + "api/activations", data=json.dumps({"text": text, "unit": 10_000}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request)
        assert error.value.code == 400 and "unit" in json.loads(error.value.read())["error"]
    finally:
        process.terminate()
        process.wait(timeout=10)
