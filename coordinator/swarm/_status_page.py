"""The /status page: which node holds which blocks, for people. Gaps are red; it refreshes itself."""

from __future__ import annotations

import html
import time

from slowllm.utils._units import format_ranges, format_span, span_blocks


def _e(value) -> str:
    """Every field a node reports is escaped: names, devices and dtypes come from strangers."""
    return html.escape(str(value))


def render_status(status: dict) -> str:
    n = status["n_layer"]
    missing = set(status["missing"])
    rows = []
    for node in status["nodes"]:
        first, last = node["layers"]
        state = "ban" if node.get("banned") else "on"
        cells = "".join(f'<td class="{state if first <= b <= last else "off"}" title="block {b}"></td>'
                        for b in range(n))
        note = f"<td class=reason>banned: {_e(node['reason'])}</td>" if node.get("banned") else ""
        rows.append(f"<tr><th>{_e(node['name'])}</th>{cells}<td>{_e(format_span(first, last))}</td>"
                    f"<td>{_e(node['device'])}/{_e(node['dtype'])}{' int8' if node.get('quantization') == 'int8' else ''}</td><td>{_e(node['speed'])}</td><td>{_e(node['load'])}</td>"
                    f"<td>{_e(node['sessions'])}</td><td>{_e(node.get('joined', ''))}</td>{note}</tr>")
    jobs = "".join(f"<li>{_e(j['job'])} by {_e(j['user'])}</li>" for j in status.get("jobs", []))
    unverified = _e(format_ranges(span_blocks(status.get("unverified_spans", [])))) or "none"
    coverage = "".join(f'<td class="{"gap" if b in missing else "ok"}" title="block {b}"></td>' for b in range(n))
    header = "".join(f"<th class=b>{b}</th>" for b in range(n))
    gaps = format_ranges(sorted(missing)) or "none"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>slowllm status</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 6px; font-size: 13px; }}
td.on {{ background: #2e7d32; }} td.off {{ background: #eee; }} td.ok {{ background: #81c784; }}
td.gap {{ background: #d32f2f; }} td.ban {{ background: #6d4c41; }} td.reason {{ color: #b71c1c; }} th.b {{ font-weight: normal; color: #666; font-size: 10px; }}
td.on, td.off, td.ok, td.gap, td.ban {{ width: 12px; height: 16px; border: 1px solid #fff; padding: 0; }}
.sw {{ display: inline-block; width: 12px; height: 12px; vertical-align: middle; }}
.sw.on {{ background: #2e7d32; }} .sw.ok {{ background: #81c784; }} .sw.gap {{ background: #d32f2f; }}
.legend, .updated {{ color: #555; font-size: 13px; }}
</style></head><body>
<h1>slowllm coordinator</h1>
<p>model <b>{_e(status['model'])}</b> ({_e(status.get('family', '?'))}), {n} blocks, {len(status['nodes'])} nodes,
draft model: <b id="draft">{_e(status.get('draft_model') or 'none')}</b>,
{status.get('active_jobs', 0)} active jobs, {status.get('sessions', 0)} generation sessions,
<span id="failovers">{status.get('failovers', 0)}</span> failovers ({status.get('replayed_bytes', 0)} bytes replayed).
Missing blocks: <b id="missing">{gaps}</b></p>
<p>Verification: {_e(status.get('verify', 0))} of hops re-run on a second node; {_e(status.get('verified_hops', 0))} checked,
{_e(status.get('disagreements', 0))} disagreements. Blocks only one node covers (hops there cannot be checked):
<b id="unverified">{unverified}</b></p>
<p>Running jobs:</p><ul id="jobs">{jobs or "<li>none</li>"}</ul>
<p class="legend"><span class="sw on"></span> block held by the node
<span class="sw ok"></span> block covered by some node <span class="sw gap"></span> block no node serves (jobs
wait for it) &middot; speed in token-blocks per second &middot; load = requests in flight</p>
<table id="coverage">
<tr><th></th>{header}<th>blocks</th><th>device</th><th>speed (tok-blocks/s)</th><th>load</th><th>sessions</th><th>joined (UTC)</th></tr>
{''.join(rows)}
<tr><th>coverage</th>{coverage}</tr>
</table>
<p class="updated" id="updated">updated {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}; refreshes every 5 s</p>
</body></html>"""
