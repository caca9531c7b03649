"""Where a batch's webhook may point: http(s) URLs whose host resolves to public addresses only.

A webhook URL comes from whoever submits a batch, and the worker that POSTs to it sits inside the
farm's network, next to Redis, MinIO and the cloud's metadata service. Left open, `--webhook
http://127.0.0.1:6379/` makes every worker POST into Redis. So a URL is refused unless its scheme is
http or https and every address its host resolves to is a public (global unicast) one: loopback,
link-local, private, shared (CGNAT), multicast, reserved and unspecified addresses are refused, an
IPv4 address written inside IPv6 included.

`ZFARM_WEBHOOK_ALLOWED_NETWORKS` lists the private networks an operator lets hooks reach (CIDRs,
comma separated), for a hook served inside the farm's network. Cloud metadata addresses are refused
even then: no hook needs them, and they hand out credentials.

The check runs on the producer at submit and again on the worker before each POST, on fresh DNS
answers: a name that resolved to a public address at submit may point elsewhere by the time the
batch finishes. The POST then connects to an address that was checked (`connection`), so no later
lookup can answer differently, and it follows no redirect.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.errors import WebhookRefused
from shared.settings import SettingsError

WEBHOOK_MAX_CHARS = 2000
ALLOWED_SCHEMES = ("http", "https")
ALLOWED_NETWORKS_ENV = "ZFARM_WEBHOOK_ALLOWED_NETWORKS"
# Instance metadata and platform endpoints of the big clouds (AWS, ECS, GCP, Azure, Alibaba, Oracle).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.169.253", "fd00:ec2::254", "168.63.129.16",
    "100.100.100.200", "192.0.0.192"))


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL: where to connect (`addresses`, every one checked) and what to ask for."""

    scheme: str
    host: str
    port: int
    target: str  # path and query, as the request line carries it
    addresses: tuple[str, ...]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allowed_networks(text: str) -> tuple[Network, ...]:
    """The networks of ZFARM_WEBHOOK_ALLOWED_NETWORKS ("10.0.0.0/8,192.168.1.20"); SettingsError
    names the entry that is no network."""
    networks = []
    for entry in (part.strip() for part in (text or "").split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise SettingsError(f"{ALLOWED_NETWORKS_ENV}: {entry!r} is not a network (e.g. 10.0.0.0/8): {exc}") \
                from None
    return tuple(networks)


def refusal(address: str, allowed_networks: tuple[Network, ...] = ()) -> str | None:
    """Why a webhook may not connect to `address`, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone index names no other address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address (always refused)"
    if any(ip.version == net.version and ip in net for net in allowed_networks):
        return None
    for kind, is_kind in (("a loopback", ip.is_loopback), ("a link-local", ip.is_link_local),
                          ("an unspecified", ip.is_unspecified), ("a multicast", ip.is_multicast),
                          ("a private", ip.is_private)):
        if is_kind:
            return f"{kind} address"
    if not ip.is_global:
        return "not a public address"
    return None


def check_url(url: str, allowed_networks: tuple[Network, ...] = (), resolve=socket.getaddrinfo) -> WebhookTarget:
    """The checked target of a webhook URL, or WebhookRefused saying why it may not be called.

    Every address the host resolves to must pass, so a name cannot hide a private address behind a
    public one. The message names the host, never the whole URL (its query may carry a token)."""
    if not isinstance(url, str) or len(url) > WEBHOOK_MAX_CHARS:
        raise WebhookRefused(f"must be an http(s) URL of at most {WEBHOOK_MAX_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise WebhookRefused(f"scheme {parts.scheme or '(none)'!r:.20} refused: http or https only")
    host = parts.hostname
    if not host:
        raise WebhookRefused("names no host")
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise WebhookRefused(f"host {host!r:.80} cannot be resolved: {exc}") from None
    addresses = tuple(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise WebhookRefused(f"host {host!r:.80} resolves to no address")
    for address in addresses:
        why = refusal(address, allowed_networks)
        if why is not None:
            hint = "" if "metadata" in why else f"; {ALLOWED_NETWORKS_ENV} lists private networks hooks may reach"
            shown = host if host == address else f"{host} resolves to {address}, which"
            raise WebhookRefused(f"{shown} is {why}{hint}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(scheme, host, port, target, addresses)


class _CheckedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to the host's checked address, never to a fresh lookup of its name."""

    def __init__(self, target: WebhookTarget, address: str, timeout_s: float):
        super().__init__(target.host, target.port, timeout=timeout_s)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the checked address; the certificate is still verified against the host's name."""

    def __init__(self, target: WebhookTarget, address: str, timeout_s: float):
        super().__init__(target.host, target.port, timeout=timeout_s, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def connection(target: WebhookTarget, address: str, timeout_s: float) -> http.client.HTTPConnection:
    """An unopened http.client connection of `target` that will connect to `address` (one of the
    checked `target.addresses`). http.client follows no redirects."""
    if address not in target.addresses:
        raise WebhookRefused(f"{address} is not an address checked for {target.host}")
    cls = _CheckedHTTPSConnection if target.scheme == "https" else _CheckedHTTPConnection
    return cls(target, address, timeout_s)
