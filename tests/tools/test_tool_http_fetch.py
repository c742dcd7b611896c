"""The `http_fetch` built-in, against a real HTTP server on a local port (no mocks)."""

import gzip
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from treadle.tools import (
    BUILTINS,
    FetchResult,
    ToolArgumentError,
    ToolError,
    ToolTimeout,
    http_fetch,
    make_http_fetch,
    web,
)
from treadle.tools.web import ALLOW_PRIVATE_ENV, is_text_type

#: bytes the endless stream had sent when each request stopped (by request id)
STREAM_SENT: dict[str, int] = {}
#: requests that reached /canary (a rebinding test's internal service)
CANARY_HITS: list[str] = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def send_body(self, status: int, content_type: str | None, body: bytes) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/hello":
            self.send_body(200, "text/plain; charset=utf-8", "héllo wörld".encode())
        elif path == "/canary":
            CANARY_HITS.append(self.path)
            self.send_body(200, "text/plain", b"internal secret")
        elif path == "/json":
            self.send_body(200, "application/json", b'{"answer": 42}')
        elif path == "/latin1":
            self.send_body(200, "text/html; charset=iso-8859-1", "café".encode("latin-1"))
        elif path == "/no-type":
            self.send_body(200, None, b"plain words")
        elif path == "/no-type-binary":
            self.send_body(200, None, b"\x00\x01\x02binary")
        elif path == "/missing":
            self.send_body(404, "text/html", b"<h1>Not Found</h1>")
        elif path == "/error":
            self.send_body(503, "application/json", b'{"error": "overloaded"}')
        elif path == "/image":
            self.send_body(200, "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
        elif path == "/sized":
            self.send_body(200, "text/plain", b"x" * int(query.split("=")[1]))
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/hello")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/to-other-loopback":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_address[1]}/hello")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://example.com/file")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/endless":
            self.endless(query)
        elif path == "/gzip-bomb":
            body = gzip.compress(b"a" * 5_000_000)  # ~5 KB on the wire, 5 MB decoded
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):  # one byte every 50 ms: each read is quick
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        else:
            self.send_body(500, "text/plain", b"unknown test route")

    def endless(self, request_id: str) -> None:
        """Chunked text with no Content-Length, for as long as the client reads."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"y" * 16384
        sent = 0
        try:
            while sent < 200 * 1024 * 1024:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                sent += len(chunk)
        except OSError:
            pass  # the client hung up, which is the point
        finally:
            STREAM_SENT[request_id] = sent


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # the local server must be reached directly, whatever the environment says
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    # the test server is on loopback, which http_fetch refuses unless told otherwise
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")


async def fetch(url: str, **kwargs: object) -> FetchResult:
    result = await http_fetch.invoke({"url": url, **kwargs})
    assert isinstance(result, FetchResult)
    return result


@pytest.mark.anyio
async def test_fetches_text(server: str) -> None:
    got = await fetch(f"{server}/hello")
    assert got.status == 200 and got.reason == "OK"
    assert got.text == "héllo wörld"
    assert got.content_type == "text/plain; charset=utf-8"
    assert got.bytes_read == len("héllo wörld".encode())
    assert got.truncated is False
    assert got.url == f"{server}/hello"
    assert (await fetch(f"{server}/json")).text == '{"answer": 42}'


@pytest.mark.anyio
async def test_decodes_the_declared_charset_and_untyped_text(server: str) -> None:
    assert (await fetch(f"{server}/latin1")).text == "café"
    untyped = await fetch(f"{server}/no-type")
    assert untyped.content_type is None and untyped.text == "plain words"


@pytest.mark.anyio
async def test_http_error_statuses_are_returned_not_raised(server: str) -> None:
    missing = await fetch(f"{server}/missing")
    assert missing.status == 404
    assert missing.reason == "Not Found"
    assert missing.text == "<h1>Not Found</h1>"
    overloaded = await fetch(f"{server}/error")
    assert overloaded.status == 503 and "overloaded" in overloaded.text


@pytest.mark.anyio
async def test_follows_redirects_and_reports_the_final_url(server: str) -> None:
    got = await fetch(f"{server}/redirect")
    assert got.status == 200 and got.text == "héllo wörld"
    assert got.url == f"{server}/hello"
    with pytest.raises(ToolError, match="more than 5 redirects"):
        await fetch(f"{server}/loop")
    with pytest.raises(ToolError, match="unsupported URL"):
        await fetch(f"{server}/to-ftp")


@pytest.mark.anyio
async def test_declared_size_over_the_limit_is_refused_before_reading(server: str) -> None:
    assert (await fetch(f"{server}/sized?n=100", max_bytes=100)).bytes_read == 100
    with pytest.raises(ToolError, match=r"101 bytes, more than max_bytes=100; not read"):
        await fetch(f"{server}/sized?n=101", max_bytes=100)


@pytest.mark.anyio
async def test_streamed_body_stops_at_the_limit(server: str) -> None:
    with pytest.raises(ToolError) as info:
        await fetch(f"{server}/endless?run1", max_bytes=50_000)
    assert info.value.tool == "http_fetch"
    assert "larger than max_bytes=50000; stopped reading" in info.value.reason
    # the server notices the hang-up; it must have sent far less than the 200 MB it offers
    for _ in range(500):
        if "run1" in STREAM_SENT:
            break
        time.sleep(0.01)
    assert 50_000 <= STREAM_SENT["run1"] < 50 * 1024 * 1024


@pytest.mark.anyio
async def test_the_limit_counts_decoded_bytes(server: str) -> None:
    with pytest.raises(ToolError, match="larger than max_bytes=1000000"):
        await fetch(f"{server}/gzip-bomb", max_bytes=1_000_000)


@pytest.mark.anyio
async def test_text_is_cut_to_max_chars(server: str) -> None:
    got = await fetch(f"{server}/sized?n=500", max_chars=100)
    assert got.truncated is True
    assert got.text == "x" * 100
    assert got.bytes_read == 500


@pytest.mark.anyio
async def test_binary_content_is_refused(server: str) -> None:
    with pytest.raises(ToolError, match="image/png, not text"):
        await fetch(f"{server}/image")
    with pytest.raises(ToolError, match="looks binary"):
        await fetch(f"{server}/no-type-binary")


@pytest.mark.anyio
async def test_whole_response_deadline_beats_a_dripping_server(server: str) -> None:
    with pytest.raises(ToolTimeout) as info:
        await fetch(f"{server}/drip", timeout_s=0.3)
    assert "within 0.3 s" in info.value.reason
    assert http_fetch.stats.failures >= 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/file", "only http:// and https:// URLs can be fetched, not ftp:"),
        ("file:///etc/passwd", "not file:"),
        ("javascript:alert(1)", "not javascript:"),
        ("example.com/page", "has no scheme; write http:// or https://"),
        ("http://", "no host"),
        ("http://[::1", "not a valid URL"),
    ],
)
async def test_refuses_other_schemes_and_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ToolError) as info:
        await fetch(url)
    assert message in info.value.reason


@pytest.mark.anyio
async def test_connection_failure_is_a_clear_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ToolError, match="ConnectError"):
        await fetch(f"http://127.0.0.1:{port}/")


@pytest.mark.anyio
async def test_limits_the_caller_may_ask_for_are_capped(server: str) -> None:
    small = make_http_fetch(name="fetch_small", max_bytes_cap=1000, timeout_cap_s=2.0)
    props = small.parameters_schema["properties"]
    assert props["max_bytes"]["maximum"] == 1000 and props["max_bytes"]["default"] == 1000
    assert props["timeout_s"]["maximum"] == 2.0
    with pytest.raises(ToolArgumentError, match="max_bytes"):
        await small.invoke({"url": f"{server}/hello", "max_bytes": 1001})
    with pytest.raises(ToolArgumentError, match="timeout_s"):
        await small.invoke({"url": f"{server}/hello", "timeout_s": 0})
    got = await small.invoke({"url": f"{server}/hello"})
    assert got.text == "héllo wörld"


def test_declaration() -> None:
    assert BUILTINS["http_fetch"] is http_fetch
    assert set(BUILTINS) == {"calculator", "http_fetch", "read_file"}
    assert http_fetch.is_async and http_fetch.idempotent
    assert http_fetch.max_concurrency is not None
    assert http_fetch.expected_duration_s is not None and http_fetch.timeout_s is not None
    params = http_fetch.parameters_schema
    assert params["required"] == ["url"]
    # the tool's own timeout sits above the largest per-call deadline a caller may pick
    assert http_fetch.timeout_s > params["properties"]["timeout_s"]["maximum"]


@pytest.mark.parametrize(
    ("content_type", "text"),
    [
        ("text/html; charset=utf-8", True),
        ("application/json", True),
        ("application/ld+json", True),
        ("application/atom+xml", True),
        ("image/svg+xml", True),
        ("image/png", False),
        ("application/octet-stream", False),
        ("application/pdf", False),
        ("video/mp4", False),
    ],
)
def test_text_types(content_type: str, text: bool) -> None:
    assert is_text_type(content_type) is text


@pytest.mark.anyio
async def test_internal_addresses_are_refused_by_default(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_PRIVATE_ENV)
    with pytest.raises(ToolError, match=r"127\.0\.0\.1 is an internal address"):
        await fetch(f"{server}/hello")
    with pytest.raises(ToolError, match="internal address"):
        await fetch("http://169.254.169.254/latest/meta-data/")  # cloud metadata
    with pytest.raises(ToolError, match="internal address"):
        await fetch("http://[::ffff:10.0.0.1]/")  # IPv4 inside IPv6
    strict = make_http_fetch(name="strict_fetch", allow_private=False)
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")  # the tool's own setting wins
    with pytest.raises(ToolError, match="internal address"):
        await strict.invoke({"url": f"{server}/hello"})


@pytest.mark.anyio
async def test_every_redirect_hop_is_checked(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_PRIVATE_ENV)
    # only 127.0.0.2 counts as internal here: the first hop passes, the redirect does not
    monkeypatch.setattr(web, "_internal", lambda address: str(address) == "127.0.0.2")
    assert (await fetch(f"{server}/hello")).status == 200
    with pytest.raises(ToolError, match=r"127\.0\.0\.2 is an internal address"):
        await fetch(f"{server}/to-other-loopback")


@pytest.mark.anyio
async def test_the_connection_goes_to_the_address_that_was_checked(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a hostile name server answers the check with a public address and the
    connection's own lookup with loopback. The name is resolved once: the connection goes
    to the public address it checked (unreachable here), and the internal service behind
    loopback never sees the request."""
    monkeypatch.delenv(ALLOW_PRIVATE_ENV)
    port = httpx.URL(server).port
    answers = iter(["93.184.216.34"] + ["127.0.0.1"] * 10)

    def rebinding(host: str, *args: object, **kwargs: object) -> list[object]:
        if host != "rebind.test":
            return real(host, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    CANARY_HITS.clear()
    with pytest.raises(ToolError):
        await fetch(f"http://rebind.test:{port}/canary", timeout_s=2)
    assert CANARY_HITS == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    "host",
    [
        "[::127.0.0.1]",  # IPv4-compatible IPv6
        "[64:ff9b::7f00:1]",  # NAT64 (RFC 6052)
        "[64:ff9b:1::a00:1]",  # local-use NAT64 (RFC 8215)
        "[2002:7f00:1::1]",  # 6to4 of 127.0.0.1
        "[2002:a9fe:a9fe::1]",  # 6to4 of the cloud metadata address
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]",  # Teredo, client 127.0.0.1
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
    ],
)
async def test_ipv4_inside_ipv6_is_checked_in_every_form(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_PRIVATE_ENV)
    with pytest.raises(ToolError, match="internal address"):
        await fetch(f"http://{host}/")


def test_public_addresses_in_ipv6_forms_stay_public() -> None:
    import ipaddress

    for text in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700:4700::1111"):
        assert not web._internal(ipaddress.ip_address(text)), text
