"""The network at a glance: `GET /status`, a page for people (operators, runners, curious clients).

Nodes with their accelerator, operator, live state, consensus quality, share of this gateway's traffic
and typical time to first token; recent epochs with their settlement transactions and rewards per
operator. Rendered on the server with Jinja2 (autoescaped: node ids and operators come from strangers),
no script, refreshed by the browser every 10 s. `GET /status.json` is the same view as data.
"""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, select_autoescape

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="10">
<title>meritnet status</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
 table { border-collapse: collapse; margin-bottom: 2em; }
 th, td { border-bottom: 1px solid #ddd; padding: 4px 12px; text-align: left; }
 td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .live { color: #080; } .down { color: #b00; }
 code { font-size: 12px; }
</style>
</head>
<body>
<h1>meritnet</h1>
<p>{{ live }} of {{ nodes|length }} nodes live &middot; models: {{ models|join(", ") or "none" }}</p>
{% for model, d in (degraded or {}).items() %}
<p class="down" data-degraded="{{ model }}">Degraded: filter {{ d.filter }} would have refused every node of
{{ model }}; the best remaining node serves it (responses carry x-meritnet-degraded). Check the validators.</p>
{% endfor %}
<h2>Nodes</h2>
<table id="nodes">
<thead><tr><th>node</th><th>model</th><th>accelerator</th><th>kind</th><th>state</th><th>quality</th>
<th>traffic</th><th>TTFT</th><th>operator</th></tr></thead>
<tbody>
{% for n in nodes %}
<tr data-node="{{ n.node_id }}">
 <td>{{ n.node_id }}</td><td>{{ n.model }}</td><td>{{ n.accelerator }}</td><td>{{ n.kind }}</td>
 <td class="{{ 'live' if n.live else 'down' }}">{{ "live" if n.live else "down" }}</td>
 <td class="num">{{ "%.2f"|format(n.quality) if n.quality is not none else "unscored" }}</td>
 <td class="num">{{ "%.0f%%"|format(100 * n.share) }}</td>
 <td class="num">{{ "%.0f ms"|format(n.ttft_ms) if n.ttft_ms is not none else "-" }}</td>
 <td><code>{{ n.operator }}</code></td>
</tr>
{% endfor %}
</tbody>
</table>
<h2>Recent epochs</h2>
{% if epochs %}
<table id="epochs">
<thead><tr><th>epoch</th><th>transaction</th><th>rewards (wei) per operator</th></tr></thead>
<tbody>
{% for e in epochs %}
<tr data-epoch="{{ e.epoch }}">
 <td class="num">{{ e.epoch }}</td><td><code>{{ e.tx or "pending" }}</code></td>
 <td>{% for op, wei in e.rewards.items() %}<code>{{ op }}</code>: {{ wei }}<br>{% endfor %}</td>
</tr>
{% endfor %}
</tbody>
</table>
{% elif epochs is none %}
<p id="epochs">Settlement did not answer; epochs are not shown.</p>
{% else %}
<p id="epochs">No epoch settled yet{{ "" if settlement else " (settlement is off)" }}.</p>
{% endif %}
</body>
</html>
"""

_TEMPLATE = Environment(autoescape=select_autoescape(default=True)).from_string(_PAGE)


def render(view: dict[str, Any]) -> str:
    """The HTML page of a status view (`routing.views.PublicViews.status()`)."""
    live = sum(1 for n in view["nodes"] if n["live"])
    models = sorted({n["model"] for n in view["nodes"]})
    return _TEMPLATE.render(live=live, models=models, **view)
