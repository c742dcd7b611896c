"""The daemon's web view in a real browser: headless Chromium (Debian's `chromium`, driven
by Playwright for Python through `executable_path`; `.ci/run` installs it). A run's page
shows its nodes, follows the run live (a node held by a gate turns running, then everything
done, tokens streamed), has no console errors, fits 1280×800 and a phone's width, and
answers a request for input from its form. Screenshots go to the test's temp dir."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gates import gate
from ui_support import ANSWER, ASK, HELD, ViewDaemon, view_daemon

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="apt-get install chromium")
WAIT_MS = 20_000


@pytest.fixture
def daemon(redis_url: str) -> Iterator[ViewDaemon]:
    yield from view_daemon(redis_url)


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A browser tab that keeps every console error and uncaught exception."""

    def __init__(self, browser: Any, width: int, height: int) -> None:
        self.tab = browser.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.tab.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.tab.on("pageerror", lambda e: self.errors.append(str(e)))

    def login(self, url: str, key: str, target: str) -> None:
        self.tab.goto(f"{url}/ui/login?next={target}")
        self.tab.fill("input[name=key]", key)
        self.tab.click("button[type=submit]")
        self.tab.wait_for_url(f"{url}{target}")

    def node_class(self, node: str) -> str:
        found: str = self.tab.get_attribute(f'svg.dag g.node[data-node="{node}"]', "class")
        return found

    def wait_node(self, node: str, status: str) -> None:
        self._wait(f'svg.dag g.node.st-{status}[data-node="{node}"]')

    def wait_status(self, status: str) -> None:
        self._wait(f"#run-status.st-{status}")

    def _wait(self, selector: str) -> None:
        try:
            self.tab.wait_for_selector(selector, timeout=WAIT_MS)
        except playwright.TimeoutError:
            status = self.tab.inner_text("#run-status")
            events = self.tab.inner_text("#events")[-2000:]
            raise AssertionError(
                f"no {selector}: the run is {status}; events:\n{events}\n{self.errors}"
            ) from None


def test_run_page_follows_a_run_live(daemon: ViewDaemon, browser: Any, tmp_path: Path) -> None:
    key = daemon.tenant("acme")
    name = uuid.uuid4().hex
    run_id = daemon.submit(key, HELD.format(gate=name, answer=ANSWER), {"topic": "live"})
    page = Page(browser, 1280, 800)
    page.login(daemon.url, key, f"/ui/runs/{run_id}")
    tab = page.tab
    # the graph's nodes, drawn from the compiled workflow
    drawn = tab.eval_on_selector_all("svg.dag g.node", "gs => gs.map(g => g.dataset.node)")
    assert drawn == ["first", "wait", "last"] or sorted(drawn) == ["first", "last", "wait"]
    # live: the held node turns running while the run waits on the gate...
    page.wait_node("first", "done")
    page.wait_node("wait", "running")
    assert "st-pending" in page.node_class("last")
    assert tab.inner_text("#run-status") == "running"
    tab.screenshot(path=str(tmp_path / "run-page-running.png"), full_page=True)
    gate(name).set()
    # ... then the rest finishes, in the same page, with no reload
    page.wait_node("last", "done")
    page.wait_status("succeeded")
    tab.wait_for_function(
        "() => [...document.querySelectorAll('#tokens pre')].length == 2", timeout=WAIT_MS
    )
    streamed = tab.eval_on_selector_all("#tokens pre", "ps => ps.map(p => p.textContent)")
    assert all(text.strip() == ANSWER for text in streamed)
    tab.wait_for_selector("#timeline .tl-row", timeout=WAIT_MS)
    assert tab.locator("#timeline .seg-decode").count() >= 2  # prefill/decode split
    tab.wait_for_selector('.node-card[data-node="last"] .dot.st-done', timeout=WAIT_MS)
    tab.click('svg.dag g.node[data-node="wait"]')
    assert "released" in tab.inner_text('.node-card[data-node="wait"]')  # its output
    tab.screenshot(path=str(tmp_path / "run-page-1280.png"), full_page=True)
    # a phone's width: the page reflows, nothing wider than the screen
    tab.set_viewport_size({"width": 390, "height": 844})
    tab.reload()
    page.wait_status("succeeded")
    page.wait_node("last", "done")
    assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert tab.is_visible('svg.dag g.node[data-node="wait"]')
    tab.screenshot(path=str(tmp_path / "run-page-390.png"), full_page=True)
    # the runs list: a status filter and a search by id prefix
    tab.set_viewport_size({"width": 1280, "height": 800})
    tab.goto(f"{daemon.url}/ui/?status=succeeded&q={run_id[:6]}")
    assert tab.locator(f'a[href="/ui/runs/{run_id}"]').count() == 1
    tab.goto(f"{daemon.url}/ui/?status=failed")
    assert tab.locator(f'a[href="/ui/runs/{run_id}"]').count() == 0
    assert page.errors == []


def test_answer_a_waiting_run_from_its_form(
    daemon: ViewDaemon, browser: Any, tmp_path: Path
) -> None:
    key = daemon.tenant("acme")
    run_id = daemon.submit(key, ASK, {"topic": "forms"})
    page = Page(browser, 1280, 800)
    page.login(daemon.url, key, f"/ui/runs/{run_id}")
    tab = page.tab
    page.wait_status("waiting")
    page.wait_node("check", "waiting")
    form = '#inputs-needed form[data-node="check"]'
    tab.wait_for_selector(form, timeout=WAIT_MS)
    assert "Publish this draft?" in tab.inner_text("#inputs-needed")
    tab.check(f"{form} input[name=approved]")
    tab.fill(f"{form} input[name=note]", "ship it")
    tab.screenshot(path=str(tmp_path / "run-page-ask.png"), full_page=True)
    tab.click(f"{form} button[type=submit]")
    page.wait_status("succeeded")
    page.wait_node("publish", "done")
    assert tab.is_hidden("#inputs-needed")
    with daemon.api(key) as c:
        run = c.get(f"/v1/runs/{run_id}").json()
    assert run["status"] == "succeeded" and run["output"]["approved"] is True
    assert page.errors == []
