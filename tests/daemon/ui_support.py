"""A daemon with its web view for the UI tests: uvicorn (one worker) on the private Redis,
a tenant with a key, and workflows that hold a node until the test says (`gates`), ask a
person, and stream an answer's tokens."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import anyio
import httpx
from daemon_support import LiveServer, make_config

from treadle.runtime.daemon.api.app import create_app
from treadle.runtime.daemon.keys import DaemonKeys
from treadle.runtime.daemon.tenants import TenantStore
from treadle.runtime.stores.redis import connect

#: `first` streams its answer, `wait` holds until its gate opens, `last` streams again
HELD = """\
name: held
inputs:
  topic: str
models:
  default: {{backend: sim, speed: 20.0, rules: [{{match: ".", content: "{answer}"}}]}}
nodes:
  - {{id: first, kind: llm, prompt: "Start on {{t}}", inputs: {{t: $input.topic}}}}
  - {{id: wait, kind: func, fn: 'gates:held', inputs: {{name: "{gate}", after: $first}}}}
  - {{id: last, kind: llm, prompt: "Finish {{a}} after {{w}}", inputs: {{a: $first, w: $wait}}}}
outputs:
  text: $last
"""
ANSWER = " ".join(f"token{i}" for i in range(40))

ASK = """\
name: review
inputs:
  topic: str
types:
  Verdict: {approved: bool, note: {type: str, default: ""}}
models:
  default: {backend: scripted}
nodes:
  - {id: draft, kind: llm, prompt: "Draft {t}", inputs: {t: $input.topic}}
  - {id: check, kind: ask, prompt: "Publish this draft? {d}", output: Verdict, inputs: {d: $draft}}
  - {id: publish, kind: llm, prompt: "Publish {d} ({ok})", inputs: {d: $draft, ok: $check.approved}}
outputs:
  approved: $check.approved
  result: $publish
"""


@dataclass
class ViewDaemon:
    url: str
    redis_url: str
    keys: dict[str, str] = field(default_factory=dict)

    def tenant(self, name: str) -> str:
        """A new tenant's API key (its own Redis client, on a thread of its own: the
        server's clients belong to its loop, and Playwright's runs on this thread)."""

        async def make() -> str:
            client = connect(self.redis_url)
            try:
                tenants = TenantStore(client, DaemonKeys())
                await tenants.create(name, max_concurrent_runs=100)
                return (await tenants.issue_key(name)).token
            finally:
                await client.aclose()

        with ThreadPoolExecutor(1) as pool:
            self.keys[name] = pool.submit(anyio.run, make).result()
        return self.keys[name]

    def api(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"},
                            timeout=30)  # fmt: skip

    def submit(self, key: str, definition: str, inputs: dict[str, object]) -> str:
        with self.api(key) as c:
            made = c.post("/v1/workflows", json={"definition": definition})
            assert made.status_code == 201, made.text
            resp = c.post("/v1/runs", json={"workflow": made.json()["name"], "inputs": inputs})
            assert resp.status_code == 201, resp.text
            run_id: str = resp.json()["run_id"]
            return run_id


def view_daemon(redis_url: str) -> Iterator[ViewDaemon]:
    config = make_config(redis_url, allow_imports=("gates",))
    with LiveServer(create_app(config, workers=1)) as server:
        yield ViewDaemon(server.url, redis_url)
