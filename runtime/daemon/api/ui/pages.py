"""The web view's HTML, rendered on the server: the runs list, a run's page (its DAG drawn
here; everything live is filled in by `static/app.js` from the run's state and events) and
the daemon's login page. Every value is escaped; pages carry no inline script or style, so
the Content-Security-Policy (`CSP`) can forbid both.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from urllib.parse import urlencode

from treadle.runtime.core.store import RunStatus
from treadle.runtime.daemon.api.ui.source import RunPage

#: what the pages may load: their own scripts, styles and API, nothing else
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
STATUSES: tuple[RunStatus, ...] = (
    "pending", "running", "waiting", "interrupted", "succeeded", "failed", "cancelled",
)  # fmt: skip


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def layout(title: str, body: str, *, base: str, viewer: str | None, page: str) -> str:
    """A whole page: header (the tenant and a way out on the daemon), then `body`."""
    who = ""
    if viewer is not None:
        who = (
            f'<span class="viewer">tenant <b>{escape(viewer)}</b></span>'
            f'<form method="post" action="{base}/logout" class="logout">'
            '<button type="submit">Log out</button></form>'
        )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · treadle</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{base}/static/app.css">
<script src="{base}/static/app.js" defer></script>
</head>
<body data-page="{page}" data-base="{escape(base)}">
<header class="top"><a class="brand" href="{base}/">treadle</a>
<nav><a href="{base}/">Runs</a></nav><div class="who">{who}</div></header>
<main>
{body}
</main>
</body>
</html>
"""


def runs_page(
    page: RunPage,
    *,
    base: str,
    viewer: str | None,
    status: str | None,
    prefix: str | None,
    cursor: str | None,
) -> str:
    options = ['<option value="">any status</option>'] + [
        f'<option value="{s}"{" selected" if s == status else ""}>{s}</option>' for s in STATUSES
    ]
    rows = []
    for row in page.rows:
        version = f" v{escape(row.version)}" if row.version else ""
        error = escape((row.error or "")[:120])
        rows.append(
            f'<tr><td class="id"><a href="{base}/runs/{escape(row.run_id)}">'
            f"<code>{escape(row.run_id)}</code></a></td>"
            f"<td>{escape(row.workflow)}{version}</td>"
            f'<td><span class="badge st-{escape(row.status)}">{escape(row.status)}</span></td>'
            f'<td>{_when(row.created_at)}</td><td class="err">{error}</td></tr>'
        )
    table = (
        '<table class="runs"><thead><tr><th>run</th><th>workflow</th><th>status</th>'
        f"<th>created</th><th>error</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p class="empty">No runs match.</p>'
    )
    more = ""
    if page.next_cursor:
        query = {"status": status or "", "q": prefix or "", "cursor": page.next_cursor}
        more = f'<p class="more"><a href="{base}/?{urlencode(query)}">Older runs →</a></p>'
    newest = f'<a href="{base}/">newest</a>' if cursor else ""
    body = f"""<section class="runs-list">
<h1>Runs</h1>
<form class="filters" method="get" action="{base}/">
<label>Status <select name="status">{"".join(options)}</select></label>
<label>Run id <input name="q" value="{escape(prefix or "")}" placeholder="id or prefix"
 autocomplete="off" spellcheck="false"></label>
<button type="submit">Filter</button> {newest}
</form>
{table}
{more}
</section>"""
    return layout("Runs", body, base=base, viewer=viewer, page="runs")


def run_page(
    run_id: str, workflow: str, status: str, svg: str | None, *, base: str, viewer: str | None
) -> str:
    drawing = svg or '<p class="empty">The workflow of this run cannot be loaded to draw.</p>'
    rid = escape(run_id)
    body = f"""<section class="run" data-run="{rid}">
<div class="run-head">
<h1><span class="wf">{escape(workflow)}</span> <code class="rid">{rid}</code></h1>
<span id="run-status" class="badge st-{escape(status)}">{escape(status)}</span>
<span id="run-meta" class="meta"></span>
</div>
<div id="run-error" class="error-box" hidden></div>
<div id="inputs-needed" class="ask" hidden></div>
<div class="grid">
<section class="panel dag-panel"><h2>Graph</h2><div class="dag-wrap">{drawing}</div>
<ul class="legend">
<li class="st-pending">pending</li><li class="st-running">running</li>
<li class="st-waiting">waiting</li><li class="st-done">done</li>
<li class="st-failed">failed</li><li class="st-skipped">skipped</li></ul></section>
<section class="panel nodes-panel"><h2>Nodes</h2><div id="nodes"></div></section>
</div>
<section class="panel"><h2>Timeline</h2><div id="timeline" class="timeline"></div>
<ul class="legend seg-legend">
<li class="seg-queue">queue</li><li class="seg-prefill">prefill</li>
<li class="seg-decode">decode</li><li class="seg-tool">tool</li><li class="seg-pin">pin</li>
<li class="seg-wait">wait</li><li class="seg-attempt">node</li>
<li class="seg-failed">failed</li></ul></section>
<section class="panel"><h2>Token streams</h2><div id="tokens" class="tokens">
<p class="empty">No streamed tokens yet.</p></div></section>
<section class="panel"><h2>Run</h2><div id="run-io"></div></section>
<section class="panel"><h2>Events</h2><ol id="events" class="events"></ol></section>
</section>"""
    return layout(f"{workflow} {run_id[:12]}", body, base=base, viewer=viewer, page="run")


def login_page(*, base: str, error: str | None, next_url: str) -> str:
    problem = f'<p class="error-box">{escape(error)}</p>' if error else ""
    body = f"""<section class="login">
<h1>Log in</h1>
<p>Use one of your tenant's API keys (<code>treadle tenants create</code> made it). The
view shows that tenant's runs only.</p>
{problem}
<form method="post" action="{base}/login">
<input type="hidden" name="next" value="{escape(next_url)}">
<label>API key <input type="password" name="key" autocomplete="current-password"
 required autofocus></label>
<button type="submit">Log in</button>
</form>
</section>"""
    return layout("Log in", body, base=base, viewer=None, page="login")


def not_found_page(message: str, *, base: str, viewer: str | None) -> str:
    body = (
        f"<section><h1>Not found</h1><p>{escape(message)}</p>"
        f'<p><a href="{base}/">All runs</a></p></section>'
    )
    return layout("Not found", body, base=base, viewer=viewer, page="error")
