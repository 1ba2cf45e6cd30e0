"""The MLflow UI on a finished smoke study, as a researcher uses it: the real server on a loopback
port, Debian's Chromium (headless) driven by Selenium. Screenshots go to $NVAE_SCREENSHOT_DIR
(default: the test's temporary folder)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import free_port, wait_for_http
from mlflow.tracking import MlflowClient

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=(
    "needs Debian's chromium and chromium-driver (.ci/run installs them: apt-get install chromium chromium-driver)"))]


@pytest.fixture(scope="module")
def ui(finished_study, tmp_path_factory):
    """`mlflow server` on the study's store, and a headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    _, uri = finished_study
    port = free_port()
    log = open(tmp_path_factory.mktemp("ui") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_for_http(f"{base}/health", server, log.name, seconds=120)
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=2600,1100"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    shots = os.environ.get("NVAE_SCREENSHOT_DIR") or str(tmp_path_factory.mktemp("screenshots"))
    os.makedirs(shots, exist_ok=True)
    yield base, browser, shots, MlflowClient(uri)
    browser.quit()
    server.terminate()
    server.wait(timeout=30)


def _wait_for(browser, predicate, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        text = browser.find_element("tag name", "body").text
        if predicate(text):
            return text
        time.sleep(0.5)
    return browser.find_element("tag name", "body").text


def _show_column(browser, name):
    """Tick a column in the runs table's Columns menu, as a user does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Columns").click()
    search = _wait_element(browser, By.CSS_SELECTOR, "input[placeholder='Search columns']")
    search.send_keys(name)
    # an item of the menu's tree whose whole title is the name (learning_rate, not learning_rate_min)
    _wait_element(browser, By.XPATH, f"//span[contains(@class, 'tree-title')][normalize-space(.)='{name}']").click()
    search.send_keys(Keys.ESCAPE)


def _wait_element(browser, by, value, seconds=20):
    deadline = time.time() + seconds
    while True:
        found = browser.find_elements(by, value)
        if found:
            return found[0]
        if time.time() > deadline:
            raise AssertionError(f"no element {value!r} on the page after {seconds} s")
        time.sleep(0.3)


def test_the_experiment_lists_the_trials_with_test_bpd_and_factor_params(ui):
    base, browser, shots, client = ui
    experiment = client.get_experiment_by_name("test_study")
    finished = client.search_runs([experiment.experiment_id], "tags.`nvae.status` = 'finished'")
    assert len(finished) == 2
    query = "searchFilter=metrics.test_bpd%20%3E%200&orderByKey=metrics.%60test_bpd%60&orderByAsc=true"
    browser.get(f"{base}/#/experiments/{experiment.experiment_id}/runs?{query}")
    names = [r.info.run_name for r in finished]
    _wait_for(browser, lambda text: "2 matching runs" in text)
    for column in ("test_bpd", "activation", "learning_rate"):
        _show_column(browser, column)
    text = _wait_for(browser, lambda text: all(n in text for n in names) and "swish" in text and "elu" in text)
    browser.save_screenshot(os.path.join(shots, "mlflow_experiment_runs.png"))
    assert all(name in text for name in names), text[-2000:]
    shown = [float(v) for v in re.findall(r"\b0\.\d{2,}\b", text)]
    for run in finished:
        assert any(abs(v - run.data.metrics["test_bpd"]) < 1e-3 for v in shown), (run.info.run_name, shown)
    assert "swish" in text and "elu" in text and "0.01" in text


def test_the_runs_comparison_page_loads_with_params_and_metrics(ui):
    base, browser, shots, client = ui
    experiment = client.get_experiment_by_name("test_study")
    children = client.search_runs([experiment.experiment_id], "tags.`nvae.status` = 'finished'")
    ids = json.dumps([r.info.run_id for r in children])
    browser.get(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment.experiment_id])}")
    text = _wait_for(browser, lambda text: "Parameters" in text and "Metrics" in text and "factor.act" in text)
    browser.save_screenshot(os.path.join(shots, "mlflow_compare_runs.png"))
    assert all(r.info.run_name in text for r in children)
    assert re.search(r"activation\s+(elu|swish)\s+(elu|swish)", text)  # one column per run
    assert re.search(r"factor\.act\s+(ELU|Swish)\s+(ELU|Swish)", text) and "nvae.status" in text
    assert "Metrics" in text and "active_units" in text  # the metrics table (virtualized: its head only)
