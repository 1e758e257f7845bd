"""Prometheus metric families: those the Grafana dashboard queries and those an endpoint serves."""

from __future__ import annotations


def dashboard_metrics(prefix: str) -> set[str]:
    """Metric families that deploy/grafana/dashboards/meritnet.json queries, of those named `prefix`*."""
    import json
    import re
    from pathlib import Path

    dashboard = Path(__file__).parents[2] / "deploy" / "grafana" / "dashboards" / "meritnet.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    found = {m for e in exprs for m in re.findall(rf"\b{prefix}\w+", e)}
    return {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in found}


def live_families(url: str) -> set[str]:
    """Metric family names a Prometheus endpoint serves right now."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name for f in text_string_to_metric_families(httpx.get(url, timeout=30).text)}


def sample_sum(url: str, family: str, **labels: str) -> float:
    """The sum of a Prometheus endpoint's samples of `family` (a counter's `_total` included) whose
    labels include `labels`; 0 when there is none."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for f in text_string_to_metric_families(httpx.get(url, timeout=30).text)
        if f.name == family
        for s in f.samples
        if s.name in (family, family + "_total") and labels.items() <= s.labels.items()
    )
