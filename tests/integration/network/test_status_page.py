"""The status page (issue 14) in a real headless browser (Debian's chromium through selenium) against
the package's network: a row per node with its state, and the epochs the settlement clock settled, each
with its transaction. A screenshot is saved in the test's temp folder."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.integration


def _browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,900")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))


def test_the_status_page_shows_nodes_and_settled_epochs(network, client, tmp_path):
    from selenium.webdriver.common.by import By

    client.completions.create(model="default", prompt="status?", max_tokens=2)
    deadline = time.monotonic() + 3 * network.config.epoch_length_s + 60  # the clock settles each epoch
    while not httpx.get(f"{network.base_url}/status.json", timeout=30).json()["epochs"]:
        assert time.monotonic() < deadline, "no settled epoch on /status"
        time.sleep(2)

    browser = _browser()
    try:
        browser.get(f"{network.base_url}/status")
        assert browser.title == "meritnet status"
        rows = {
            r.get_attribute("data-node"): r for r in browser.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")
        }
        assert {"h100-a", "l4-b"} <= set(rows), sorted(rows)
        cells = [c.text for c in rows["h100-a"].find_elements(By.TAG_NAME, "td")]
        assert cells[1:5] == ["default", "H100", "managed", "live"], cells
        epochs = browser.find_elements(By.CSS_SELECTOR, "#epochs tbody tr")
        assert epochs, "no epoch rows"
        tx = epochs[0].find_elements(By.TAG_NAME, "td")[1].text
        assert tx.startswith("0x") and len(tx) == 66, tx
        shot = tmp_path / "status.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        browser.quit()


def test_every_metric_the_dashboard_queries_is_on_the_live_metrics_page(network):
    """deploy/grafana/dashboards/meritnet.json only asks Prometheus for series the gateway exposes."""
    import json
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    dashboard = Path(__file__).parents[3] / "deploy" / "grafana" / "dashboards" / "meritnet.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(total|bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"meritnet_\w+", e)
    }
    live = {f.name for f in text_string_to_metric_families(httpx.get(f"{network.base_url}/metrics").text)}
    assert used and used <= live, sorted(used - live)
