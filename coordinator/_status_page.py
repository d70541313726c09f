"""The /status page: which node holds which blocks, for people. Gaps are red; it refreshes itself."""

from __future__ import annotations

import html


def render_status(status: dict) -> str:
    n = status["n_layer"]
    missing = set(status["missing"])
    rows = []
    for node in status["nodes"]:
        first, last = node["layers"]
        cells = "".join(f'<td class="{"on" if first <= b <= last else "off"}" title="block {b}"></td>' for b in range(n))
        rows.append(f"<tr><th>{html.escape(node['name'])}</th>{cells}<td>{first}-{last}</td>"
                    f"<td>{node['device']}/{node['dtype']}</td><td>{node['speed']}</td><td>{node['load']}</td>"
                    f"<td>{node['sessions']}</td></tr>")
    coverage = "".join(f'<td class="{"gap" if b in missing else "ok"}" title="block {b}"></td>' for b in range(n))
    header = "".join(f"<th class=b>{b}</th>" for b in range(n))
    gaps = ", ".join(map(str, sorted(missing))) or "none"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>slowllm status</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 6px; font-size: 13px; }}
td.on {{ background: #2e7d32; }} td.off {{ background: #eee; }} td.ok {{ background: #81c784; }}
td.gap {{ background: #d32f2f; }} th.b {{ font-weight: normal; color: #666; font-size: 10px; }}
td.on, td.off, td.ok, td.gap {{ width: 12px; height: 16px; border: 1px solid #fff; padding: 0; }}
</style></head><body>
<h1>slowllm coordinator</h1>
<p>model <b>{html.escape(status['model'])}</b>, {n} blocks, {len(status['nodes'])} nodes,
{status.get('active_jobs', 0)} active jobs. Missing blocks: <b id="missing">{gaps}</b></p>
<table id="coverage">
<tr><th></th>{header}<th>blocks</th><th>device</th><th>speed (tok-blocks/s)</th><th>load</th><th>sessions</th></tr>
{''.join(rows)}
<tr><th>coverage</th>{coverage}</tr>
</table></body></html>"""
