"""The Dagster UI as a user sees it, in a real headless Chromium.

The module runs the demo as the README does (`add-partitions`, then `dagster job execute` of
partition prompts.jsonl with the real SmolLM2), starts `dagster dev -w workspace.yaml` on
127.0.0.1, and drives Debian's chromium through chromedriver (selenium) to:

- the asset graph of group "demo": the seven stage assets, as graph nodes;
- the Partitions tab of demo/engine, partition prompts.jsonl chosen by a click: it is
  materialized, by our run, with the engine's metadata (rows_out 20, generated_tokens equal to
  the sum over the committed Parquet output).

Screenshots of both pages go to a temporary folder (LLM_ASSETS_UI_SCREENSHOTS=docs/ui refreshes
the tracked ones). Every server it
starts (dagster dev and its webserver, daemon and code servers; chromedriver and chromium) is
stopped by PID, and the teardown asserts that none of their processes is left.
Setup: scripts/setup-browser.sh. Skips only when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from tests.helpers.processes import free_port, stop_group, tree

PROJECT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The tracked screenshots in docs/ui change only when asked (LLM_ASSETS_UI_SCREENSHOTS=docs/ui):
# a plain test run leaves the tree clean.
SHOTS = Path(os.environ.get("LLM_ASSETS_UI_SCREENSHOTS") or Path(tempfile.gettempdir()) / "llm_assets_ui_screenshots")
STAGES = ["landing_files", "preprocess", "chat_template", "tokenize", "engine", "detokenize", "postprocess"]
PARTITION = "prompts.jsonl"
LOCATION = "definitions.py"  # workspace.yaml's python_file: the code location's name
WAIT_S = 120  # page waits; generous, since other test suites may share these 2 cores

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is missing: install Debian's chromium and chromium-driver (bash scripts/setup-browser.sh)",
    ),
    pytest.mark.timeout(480),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo in a fresh DAGSTER_HOME and storage: returns (env, run id, storage)."""
    tmp = tmp_path_factory.mktemp("ui")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp / "dagster_home"),
        "LLM_ASSETS_STORAGE": str(tmp / "storage"),
        "PYTHONPATH": str(PROJECT),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    Path(env["DAGSTER_HOME"]).mkdir()
    (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    added = subprocess.run(
        [sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", "definitions.py", "--pipeline", "demo"],
        check=False,
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "job",
            "execute",
            "-f",
            "definitions.py",
            "-j",
            "demo_job",
            "--tags",
            json.dumps({"dagster/partition": PARTITION}),
        ],
        check=False,
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "RUN_SUCCESS" in log, log[-4000:]
    run_id = re.search(r"demo_job - ([0-9a-f-]{36}) - .*RUN_SUCCESS", log).group(1)
    return env, run_id, Path(env["LLM_ASSETS_STORAGE"]), tmp


@pytest.fixture(scope="module")
def webserver(demo_run):
    """`dagster dev -w workspace.yaml` on 127.0.0.1 (its own process group), stopped by PID."""
    env, _, _, tmp = demo_run
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "dagster-dev.log"
    with open(log_path, "wb") as log:
        dev = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster"),
                "dev",
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    seen: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if dev.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dagster dev did not answer on {url}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        seen = tree(dev.pid)  # webserver, daemon, code server(s)
        yield url
    finally:
        seen += tree(dev.pid)  # code servers started after the pages loaded
        left = stop_group(dev, seen)
    assert len({p.pid for p in seen}) >= 3, f"expected dagster dev with its children, saw {seen}"
    assert not left, f"dagster dev processes left running: {left}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by Debian's chromedriver (no Selenium Manager, no downloads)."""
    assert CHROMEDRIVER.exists(), f"{CHROMEDRIVER} is missing: bash scripts/setup-browser.sh"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp / 'profile'}",
    ]:
        options.add_argument(flag)
    service = Service(
        executable_path=str(CHROMEDRIVER),
        log_output=str(tmp / "chromedriver.log"),
        popen_kw={"start_new_session": True},
    )
    driver = webdriver.Chrome(service=service, options=options)
    seen = tree(service.process.pid)  # chromedriver, chromium and its helpers
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        seen += tree(service.process.pid)
        try:
            driver.quit()
        finally:
            left = stop_group(service.process, seen, timeout=10)
    assert not left, f"chromedriver/chromium processes left running: {left}"


def _wait(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.5).until(lambda d: condition(d))
    except TimeoutException:
        text = driver.execute_script("return document.body ? document.body.innerText : ''")
        raise AssertionError(f"timed out waiting for {what} on {driver.current_url}; the page shows:\n{text[:3000]}")


def _dialog_buttons(driver):
    from selenium.webdriver.common.by import By

    return [b for b in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']") if b.is_displayed()]


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


@pytest.fixture(scope="module")
def ui(webserver, browser):
    """A user's first visit. With a fresh DAGSTER_HOME, Dagster opens a "Join the Dagster
    community" dialog over the first page on 127.0.0.1; press Skip, as a user would."""
    browser.get(f"{webserver}/overview")
    if _graphql(webserver, "{ shouldShowNux }")["shouldShowNux"]:
        _wait(browser, _dialog_buttons, "the community dialog")[0].click()
        _wait(browser, lambda d: not _dialog_buttons(d), "the community dialog to close")
    return webserver


def _screenshot(driver, name: str) -> Path:
    assert not _dialog_buttons(driver), "a dialog covers the page"
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    return path


def test_asset_graph_of_group_demo_shows_the_seven_stages(ui, browser):
    browser.get(f"{ui}/locations/{LOCATION}/asset-groups/demo")

    def node_labels(d):
        # each asset node of the graph is an SVG foreignObject; its first line is the asset's name
        return d.execute_script(
            "return Array.from(document.querySelectorAll('svg foreignObject'))"
            ".map(e => (e.firstElementChild ? e.firstElementChild.innerText : '').trim().split('\\n')[0])"
            ".filter(t => t)"
        )

    _wait(browser, lambda d: set(STAGES) <= set(node_labels(d)), "the seven asset nodes of group demo")
    labels = node_labels(browser)
    assert sorted(labels) == sorted(STAGES), labels
    body = browser.find_element("tag name", "body").text
    assert "Asset Group in" in body and LOCATION in body, body[:2000]
    assert browser.title == "Asset groups | demo"
    time.sleep(1)  # let the graph finish its fit-to-screen animation
    _screenshot(browser, "asset-graph.png")


def test_engine_partition_is_materialized_with_its_metadata(demo_run, ui, browser):
    from selenium.webdriver.common.by import By

    _, run_id, storage, _ = demo_run
    browser.get(f"{ui}/assets/demo/engine?view=partitions")
    _wait(
        browser, lambda d: "Materialized (1)" in d.find_element(By.TAG_NAME, "body").text, "the partition status counts"
    )
    body = browser.find_element(By.TAG_NAME, "body").text
    for status in ("Materialized (1)", "Missing (0)", "Failed (0)", "Materializing (0)"):
        assert status in body, body[:2000]

    # choose the partition in the list, as a user does
    item = _wait(
        browser,
        lambda d: next(
            (e for e in d.find_elements(By.XPATH, f"//*[normalize-space(text())='{PARTITION}']") if e.is_displayed()),
            None,
        ),
        f"partition {PARTITION} in the list",
    )
    item.click()

    def metadata(d) -> dict[str, str]:
        return dict(
            d.execute_script(
                "return Array.from(document.querySelectorAll('table tr'))"
                ".map(tr => Array.from(tr.querySelectorAll('td')).map(td => td.innerText.trim()))"
                ".filter(cells => cells.length >= 2).map(cells => [cells[0], cells[1]])"
            )
        )

    _wait(
        browser,
        lambda d: "rows_out" in metadata(d) and "generated_tokens" in metadata(d),
        "the materialization's metadata table",
    )
    assert "partition=" in browser.current_url and PARTITION in browser.current_url, browser.current_url
    # the partition's header: its name with a "Materialized" tag
    tags = [
        e for e in browser.find_elements(By.XPATH, "//*[normalize-space(text())='Materialized']") if e.is_displayed()
    ]
    assert len(tags) == 1, [t.text for t in tags]
    header = tags[0].find_element(By.XPATH, f"./ancestor::*[contains(normalize-space(.), '{PARTITION}')][1]")
    assert set(header.text.split("\n")) == {PARTITION, "Materialized"}, header.text
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Latest materialization" in body
    assert run_id[:8] in body, f"run {run_id[:8]} not shown:\n{body[:2000]}"
    assert "demo_job" in body

    shown = metadata(browser)
    assert shown["rows_out"] == "20", shown
    folder = storage / "demo" / "engine" / PARTITION
    manifest = json.loads((folder / "_manifest.json").read_text())
    table = pq.read_table([str(folder / name) for name in manifest["files"]], columns=["num_generated_tokens"])
    generated = sum(table.column("num_generated_tokens").to_pylist())
    assert generated > 0
    assert shown["generated_tokens"] == str(generated), (shown, generated)
    _screenshot(browser, "engine-partition.png")


def test_text_stage_shows_its_columns_and_sample_rows(demo_run, ui, browser):
    """Dagster's standard metadata as the UI shows it: the detokenize asset's row count and columns
    (dagster/row_count, dagster/column_schema) on its overview, and the partition's sample table of
    questions and answers."""
    from selenium.webdriver.common.by import By

    body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
    browser.get(f"{ui}/assets/demo/detokenize")
    _wait(browser, lambda d: "Columns" in body(d) and "generated_text" in body(d), "the asset's columns")
    shown = body(browser)
    assert "Row count\n20" in shown, shown[:2000]
    columns = shown.split("Column name Type Description", 1)[1].split("Metadata", 1)[0].split("\n")
    for column in ("row_id", "prompt", "generated_tokens", "finish_reason", "request_id", "generated_text"):
        assert column in columns, columns
    _screenshot(browser, "detokenize-columns.png")

    browser.get(f"{ui}/assets/demo/detokenize?view=partitions")
    item = _wait(
        browser,
        lambda d: next(
            (e for e in d.find_elements(By.XPATH, f"//*[normalize-space(text())='{PARTITION}']") if e.is_displayed()),
            None,
        ),
        f"partition {PARTITION} in the list",
    )
    item.click()
    key = _wait(
        browser,
        lambda d: next(
            (e for e in d.find_elements(By.XPATH, "//td[normalize-space()='sample']") if e.is_displayed()), None
        ),
        "the sample metadata",
    )
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", key)
    sample = key.find_element(By.XPATH, "./following-sibling::td[1]").text
    assert sample.startswith("prompt generated_text"), sample
    assert "What is the capital of France?" in sample and "Paris" in sample, sample
    assert len(sample.splitlines()) == 1 + 5, sample  # header and five rows
    time.sleep(0.5)
    _screenshot(browser, "detokenize-sample.png")
