"""The status page (issue 14) in a real headless browser (Debian's chromium through selenium) against
the package's network: a row per node with its state, and the epochs the settlement clock settled, each
with its transaction. A screenshot is saved in the test's temp folder."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.metrics import dashboard_metrics, live_families

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


def test_every_metric_the_dashboard_queries_is_live(network, client):
    """deploy/grafana/dashboards/meritnet.json asks only for series that exist: meritnet_* on the gateway's
    /metrics (with the settlement actor's; the scoring gauges, which need validators, are checked in the
    cheater package), and vLLM's engine metrics (ray_vllm_*) on the Ray metrics endpoints Prometheus
    scrapes (deploy/prometheus/prometheus.yml)."""
    import ray

    from scoring.metrics import REGISTRY as SCORING

    client.completions.create(model="default", prompt="metrics?", max_tokens=2)
    scoring = {m.name for m in SCORING.collect()}
    used = dashboard_metrics("meritnet_") - scoring
    live = live_families(f"{network.base_url}/metrics")
    assert used and used <= live, sorted(used - live)

    engine = dashboard_metrics("ray_vllm_")
    ports = {(n["NodeManagerAddress"], n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"]}
    deadline = time.monotonic() + 90  # Ray's agents export what workers report every few seconds
    while True:
        exported = set().union(*(live_families(f"http://{host}:{port}/metrics") for host, port in ports))
        if engine <= exported or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert engine and engine <= exported, (sorted(engine - exported), sorted(exported)[:50])
