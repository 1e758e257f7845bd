"""The status page's view and HTML (routing/status.py) over the gateway app with fake nodes; the page in
a real browser against a real network is tests/integration/network/test_status_page.py."""

from __future__ import annotations

from routing import status


def test_status_lists_every_node_with_its_share_of_traffic(harness):
    client, _nodes, _sink = harness
    for _ in range(3):
        assert client.post("/v1/completions", json={"model": "default", "prompt": "hi"}).status_code == 200
    view = client.get("/status.json").json()
    assert {n["node_id"] for n in view["nodes"]} == {"a", "b"}
    assert sum(n["share"] for n in view["nodes"]) == 1.0
    assert view["epochs"] == [] and view["settlement"] is False
    page = client.get("/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-node="a"' in page.text and "settlement is off" in page.text


def test_what_strangers_wrote_is_escaped():
    node = {
        "node_id": "<script>alert(1)</script>",
        "model": "m",
        "accelerator": "H100",
        "kind": "open",
        "operator": "0x1",
        "live": True,
        "quality": None,
        "share": 0.0,
        "ttft_ms": None,
    }
    page = status.render({"nodes": [node], "epochs": [], "settlement": True})
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    epoch = {"epoch": 3, "tx": "0xabc", "rewards": {"0xop": 5}}
    page = status.render({"nodes": [node], "epochs": [epoch], "settlement": True})
    assert 'data-epoch="3"' in page and "0xabc" in page
