"""The web view of runs: served by the daemon under `/ui` (log in with an API key; one
tenant's runs) and by `treadle ui` over the local SQLite store. Server-rendered HTML, a
DAG drawn as SVG here, and one small script of our own (`static/app.js`) that follows the
run's events; no CDN, nothing fetched from elsewhere."""
