"""The client's address and scheme, looking through trusted reverse proxies only.

A request whose TCP peer is in ``[receiver] trusted_proxies`` is read through its
forwarding header (``X-Forwarded-For`` and ``X-Forwarded-Proto``, or RFC 7239
``Forwarded`` with ``proxy_headers = "forwarded"``; never both, or a client could add
the other one itself). The addresses are read from the right, skipping trusted proxies:
the first untrusted one is the client, since everything left of it was written by
someone nobody vouches for. Any other request is what its TCP peer is.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

from aiohttp import web

log = logging.getLogger("examhook.ingest")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> Address | None:
    """An address from a forwarding header: ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``,
    ``[2001:db8::1]:80``; None for anything else (``unknown``, obfuscated names)."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientResolver:
    def __init__(self, trusted: Sequence[str], headers: str = "x-forwarded") -> None:
        self.networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in trusted]
        self.use_forwarded = headers == "forwarded"
        self._hinted = False

    def _trusted(self, address: Address | None) -> bool:
        return address is not None and any(address in network for network in self.networks)

    def _via_proxy(self, request: web.Request) -> bool:
        return bool(self.networks) and self._trusted(parse_address(request.remote or ""))

    def client(self, request: web.Request) -> str:
        """The client's address (the peer's, unless the peer is a trusted proxy)."""
        peer = request.remote or "-"
        if not self.networks or not self._via_proxy(request):
            return peer
        address, _ = self._forwarded(request)
        return str(address) if address is not None else peer

    def scheme(self, request: web.Request) -> str:
        """``https`` or ``http`` as the client used it (the proxy's word when trusted)."""
        if not self.networks or not self._via_proxy(request):
            return request.scheme
        if self.use_forwarded:
            _, proto = self._forwarded(request)
        else:
            values = request.headers.getall("X-Forwarded-Proto", [])
            proto = ",".join(values).rsplit(",", 1)[-1].strip().lower() if values else None
        return proto if proto in ("http", "https") else request.scheme

    def _forwarded(self, request: web.Request) -> tuple[Address | None, str | None]:
        """(client address, proto) from the forwarding header, read from the right."""
        hops: list[tuple[str, str | None]]
        if self.use_forwarded:
            hops = [(element.get("for", ""), element.get("proto")) for element in request.forwarded]
        else:
            values = request.headers.getall("X-Forwarded-For", [])
            hops = [(part, None) for value in values for part in value.split(",")]
        client: Address | None = None
        proto: str | None = None
        for text, hop_proto in reversed(hops):
            address = parse_address(text)
            if address is None:  # garbage: trust stops at the last proxy that vouched
                break
            client, proto = address, (hop_proto or "").lower() or None
            if not self._trusted(address):
                break
        return client, proto

    def hint(self, request: web.Request) -> None:
        """Say once when forwarding headers arrive from a peer that is not trusted: behind
        a proxy, every client would then share the proxy's failure limit."""
        if self._hinted or self._via_proxy(request):
            return
        if "X-Forwarded-For" in request.headers or "Forwarded" in request.headers:
            self._hinted = True
            log.warning(
                "requests carry X-Forwarded-For/Forwarded but their peer %s is not in"
                " receiver.trusted_proxies: failed authentications are counted against the"
                " peer's address (set trusted_proxies if a reverse proxy is in front)",
                request.remote,
            )
