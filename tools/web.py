"""The `http_fetch` built-in: GET an http(s) URL through httpx, with hard size and time limits.

The body is streamed and reading stops as soon as it passes `max_bytes` (a `ToolError`
then says so; a too-large `Content-Length` is refused before reading anything). The size
counted is the *decoded* body, so a small gzip bomb cannot slip past the limit. The whole
exchange (connect, redirects, headers, body) must finish within `timeout_s`, checked as one
deadline, so a server that drips one byte at a time cannot hold the call open.

HTTP error statuses are *not* errors of the tool: a 404 or a 500 comes back as a normal
`FetchResult` with its `status` (and body text), because "that page does not exist" is an
answer a model can act on. Only failures to get an answer at all (bad URL, refused scheme,
DNS or connection failure, timeout, too large, binary content) raise `ToolError`.

Only text is returned: the body is decoded with the charset the server declares (UTF-8
otherwise, undecodable bytes replaced), and cut to `max_chars` characters with `truncated`
set. Binary content types are refused rather than handed to a model as mojibake.
"""

# No `from __future__ import annotations` here: the tool's signature is built inside a
# factory, and its `Annotated[..., Field(le=cap)]` bounds must be evaluated where the caps
# are in scope.

import codecs
import functools
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import anyio
import httpcore
import httpx
from pydantic import BaseModel, Field

from treadle.tools.base import Tool, ToolError, ToolTimeout

DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_TIMEOUT_S = 15.0
DEFAULT_MAX_CHARS = 50_000
#: the most a caller (a model) may ask for, unless the factory is told otherwise
MAX_BYTES_CAP = 10 * 1024 * 1024
TIMEOUT_CAP_S = 60.0
USER_AGENT = "treadle-http-fetch/0.1 (+https://github.com/treadle)"
#: set to 1 to let `http_fetch` reach private, loopback and link-local addresses
ALLOW_PRIVATE_ENV = "TREADLE_HTTP_FETCH_ALLOW_PRIVATE"

_TEXT_SUBTYPES = {
    "json",
    "xml",
    "javascript",
    "ecmascript",
    "x-javascript",
    "yaml",
    "x-yaml",
    "toml",
    "csv",
    "x-www-form-urlencoded",
    "graphql",
    "sql",
    "x-sh",
    "xhtml",
}


class FetchResult(BaseModel):
    """What `http_fetch` returns (for any HTTP status, including 4xx and 5xx)."""

    url: str
    """the final URL, after redirects"""
    status: int
    reason: str
    content_type: str | None
    bytes_read: int
    """size of the (decoded) body that was read"""
    text: str
    truncated: bool
    """True when `text` was cut to `max_chars` characters"""


def is_text_type(content_type: str) -> bool:
    """Whether a Content-Type names something worth decoding as text."""
    mime = content_type.split(";", 1)[0].strip().lower()
    major, _, minor = mime.partition("/")
    if major == "text":
        return True
    if major not in {"application", "image"}:
        return False
    if major == "image":
        return minor == "svg+xml"
    return minor in _TEXT_SUBTYPES or minor.endswith(("+json", "+xml", "+yaml"))


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Building the default context (loading the CA bundle) costs ~20 ms; do it once.
    # trust_env keeps SSL_CERT_FILE / SSL_CERT_DIR working as with a plain httpx client.
    return httpx.create_ssl_context(trust_env=True)


def make_http_fetch(
    *,
    name: str = "http_fetch",
    max_bytes_cap: int = MAX_BYTES_CAP,
    timeout_cap_s: float = TIMEOUT_CAP_S,
    max_redirects: int = 5,
    user_agent: str = USER_AGENT,
    allow_private: bool | None = None,
) -> Tool:
    """An `http_fetch` tool; the caps bound what a model may ask for in one call.

    A model's URL is untrusted input, so by default every request (each redirect too) is
    refused when its host resolves to a non-public address: loopback, private networks,
    link-local (cloud metadata services), shared and reserved ranges, and IPv4 addresses
    inside IPv6 in any form (mapped, compatible, NAT64, 6to4, Teredo). The name is resolved
    once and the connection goes to an address that was checked, so a name server that
    answers differently the second time (DNS rebinding) cannot steer it to an internal
    service. `allow_private` (or, when it is None, `TREADLE_HTTP_FETCH_ALLOW_PRIVATE=1`)
    lets it reach them.
    """
    if max_bytes_cap < 1 or not timeout_cap_s > 0:
        raise ValueError("max_bytes_cap and timeout_cap_s must be positive")
    default_bytes = min(DEFAULT_MAX_BYTES, max_bytes_cap)
    default_timeout = min(DEFAULT_TIMEOUT_S, timeout_cap_s)

    async def http_fetch(
        url: str,
        max_bytes: Annotated[int, Field(ge=1, le=max_bytes_cap)] = default_bytes,
        timeout_s: Annotated[float, Field(gt=0, le=timeout_cap_s)] = default_timeout,
        max_chars: Annotated[int, Field(ge=1, le=1_000_000)] = DEFAULT_MAX_CHARS,
    ) -> FetchResult:
        """Fetch a web page or API response over HTTP(S) with GET and return its text.

        Any HTTP status (404, 500, ...) is returned in `status`, not raised.

        Args:
            url: The http:// or https:// URL to fetch.
            max_bytes: Refuse the response if its body is larger than this many bytes.
            timeout_s: Give up if the whole response has not arrived within this many seconds.
            max_chars: Return at most this many characters of text (`truncated` says so).
        """
        target = _check_url(name, url)
        with anyio.move_on_after(timeout_s) as deadline:
            return await _fetch(
                name,
                target,
                max_bytes=max_bytes,
                timeout_s=timeout_s,
                max_chars=max_chars,
                max_redirects=max_redirects,
                user_agent=user_agent,
                allow_private=allow_private,
            )
        # only reached when the deadline cancelled the fetch
        assert deadline.cancelled_caught
        raise ToolTimeout(name, f"no complete response from {url} within {timeout_s:g} s")

    return Tool(
        http_fetch,
        name=name,
        # the tool's own limit sits above the largest per-call deadline, so the clearer
        # per-call message above is what a caller normally sees
        timeout_s=timeout_cap_s + 5.0,
        expected_duration_s=0.5,
        idempotent=True,
        max_concurrency=8,
    )


def _check_url(tool_name: str, url: str) -> httpx.URL:
    try:
        target = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ToolError(tool_name, f"not a valid URL: {url!r} ({exc})") from None
    if not target.scheme:
        raise ToolError(tool_name, f"URL {url!r} has no scheme; write http:// or https://")
    if target.scheme not in ("http", "https"):
        raise ToolError(
            tool_name, f"only http:// and https:// URLs can be fetched, not {target.scheme}:"
        )
    if not target.host:
        raise ToolError(tool_name, f"URL {url!r} has no host")
    return target


async def _fetch(
    tool_name: str,
    target: httpx.URL,
    *,
    max_bytes: int,
    timeout_s: float,
    max_chars: int,
    max_redirects: int,
    user_agent: str,
    allow_private: bool | None,
) -> FetchResult:
    headers = {"User-Agent": user_agent, "Accept": "text/*, application/json, */*;q=0.5"}
    if allow_private is None:
        allow_private = os.environ.get(ALLOW_PRIVATE_ENV, "").lower() in ("1", "true", "yes")
    hooks: dict[str, list[Callable[..., Any]]] = {}
    if not allow_private:
        hooks["request"] = [functools.partial(_refuse_internal, tool_name)]
    transport = None if allow_private else _checked_transport(tool_name)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=True,
        max_redirects=max_redirects,
        headers=headers,
        verify=_ssl_context(),
        event_hooks=hooks,
        transport=transport,
    ) as client:
        try:
            async with client.stream("GET", target) as response:
                body = await _read_body(tool_name, response, max_bytes)
        except httpx.TimeoutException:
            raise ToolTimeout(
                tool_name, f"{target} did not answer within {timeout_s:g} s"
            ) from None
        except httpx.TooManyRedirects:
            raise ToolError(tool_name, f"{target}: more than {max_redirects} redirects") from None
        except httpx.UnsupportedProtocol as exc:
            raise ToolError(
                tool_name, f"{target}: redirected to an unsupported URL ({exc})"
            ) from None
        except httpx.HTTPError as exc:
            raise ToolError(
                tool_name, f"request to {target} failed: {type(exc).__name__}: {exc}"
            ) from None
    text = body.decode(_charset(response), errors="replace")
    return FetchResult(
        url=str(response.url),
        status=response.status_code,
        reason=response.reason_phrase,
        content_type=response.headers.get("content-type"),
        bytes_read=len(body),
        text=text[:max_chars],
        truncated=len(text) > max_chars,
    )


def _internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Not an address of the public internet (private, loopback, link-local, shared,
    reserved, multicast), an IPv4 address inside IPv6 in any form included."""
    if not address.is_global or address.is_multicast:
        return True
    return any(_internal(inner) for inner in _embedded_ipv4(address))


_COMPATIBLE = ipaddress.IPv6Network("::/96")  # IPv4-compatible (deprecated, RFC 4291)
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _embedded_ipv4(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: mapped (::ffff:a.b.c.d), compatible
    (::a.b.c.d), NAT64 (64:ff9b::a.b.c.d; RFC 6052 and 8215), 6to4 (2002:aabb:ccdd::) and
    Teredo (server and client)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _COMPATIBLE or any(address in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


async def _refuse_internal(tool_name: str, request: httpx.Request) -> None:
    """httpx calls this before every request, each redirect hop included: a refused host
    fails before anything is sent (a request through a proxy included, which resolves the
    name itself)."""
    port = request.url.port or (443 if request.url.scheme == "https" else 80)
    await _checked_addresses(tool_name, request.url.host, port)


class _CheckedNetwork(httpcore.AsyncNetworkBackend):
    """Connects only to addresses it has checked: it resolves the host itself, refuses it
    when any of its addresses is internal, and connects to those very addresses (by
    number), so no second lookup can lead elsewhere. TLS still verifies the host's name."""

    def __init__(self, tool_name: str) -> None:
        self.tool_name = tool_name
        self._network = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _checked_addresses(self.tool_name, host, port)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._network.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # _checked_addresses returns at least one
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("http_fetch connects over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


def _checked_transport(tool_name: str) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(verify=_ssl_context())
    # httpx has no option for the network backend; its pool is rebuilt with ours (the
    # same settings httpx gives it by default)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=_ssl_context(), network_backend=_CheckedNetwork(tool_name)
    )
    return transport


async def _checked_addresses(
    tool_name: str, host: str, port: int
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The host's addresses (it resolved once), or a ToolError when any is internal."""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ToolError(tool_name, f"cannot resolve host {host!r}: {exc}") from None
        addresses = list(
            dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
        )
    blocked = sorted(str(a) for a in addresses if _internal(a))
    if blocked or not addresses:
        raise ToolError(
            tool_name,
            f"{host} is an internal address ({', '.join(blocked) or 'none found'}): only "
            f"public addresses may be fetched (allow_private=True or {ALLOW_PRIVATE_ENV}=1 "
            "allows more)",
        )
    return addresses


async def _read_body(tool_name: str, response: httpx.Response, max_bytes: int) -> bytes:
    where = f"{response.url} (status {response.status_code})"
    content_type = response.headers.get("content-type")
    if content_type and not is_text_type(content_type):
        raise ToolError(tool_name, f"{where} is {content_type}, not text; nothing returned")
    declared = response.headers.get("content-length", "")
    # Content-Length counts encoded bytes; only trust it when the body is not compressed
    if (
        declared.isdigit()
        and int(declared) > max_bytes
        and "content-encoding" not in response.headers
    ):
        raise ToolError(
            tool_name,
            f"{where} is {declared} bytes, more than max_bytes={max_bytes}; not read",
        )
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise ToolError(
                tool_name,
                f"{where}: body larger than max_bytes={max_bytes}; stopped reading",
            )
    if content_type is None and b"\x00" in body[:4096]:
        raise ToolError(tool_name, f"{where} has no content type and looks binary")
    return bytes(body)


def _charset(response: httpx.Response) -> str:
    # a server may declare a charset Python does not know; fall back rather than fail
    charset = response.charset_encoding or "utf-8"
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return "utf-8"


#: the default tool
http_fetch = make_http_fetch()

__all__ = ["FetchResult", "http_fetch", "is_text_type", "make_http_fetch"]
