"""Where webhook tools may send requests: the gateway's egress policy against server-side request forgery.

An agent's webhook URL is written by whoever configures the agent, and the body it answers goes to the
model. Without a policy a tool at ``http://127.0.0.1:8222/varz`` reads the NATS monitor and one at
``http://169.254.169.254/`` the cloud's instance metadata. :class:`EgressPolicy` checks each destination
before :class:`~voice_gateway.agents.egress_client.EgressClient` connects to it (and each redirect's):

- **Names**: ``localhost``, single-label names and cluster-internal suffixes (``.local``,
  ``.cluster.local``, ``.internal``, ``.svc``, ``.localdomain``, ``.home.arpa``) are refused, before
  they are resolved.
- **Addresses**, after DNS resolution (every address of the answer must pass): loopback, link-local
  (169.254.0.0/16 with the metadata address, fe80::/10), private (10/8, 172.16/12, 192.168/16,
  fc00::/7), shared (CGNAT 100.64/10), unspecified, multicast, reserved and other non-global addresses
  are refused, as are the IPv4-mapped, IPv4-compatible, 6to4 and NAT64 IPv6 forms of such addresses.

The client then connects to an address that passed, never resolving the name again (no DNS rebinding).

Teams that host tools internally allow them with ``GATEWAY_TOOL_ALLOWED_NETWORKS`` (CIDRs: an address
inside passes, and a cluster-internal name passes when all its addresses are inside) and
``GATEWAY_TOOL_ALLOWED_HOSTS`` (exact host names, which pass whatever they resolve to).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import httpcore
import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

NETWORKS_SETTING = "GATEWAY_TOOL_ALLOWED_NETWORKS"
HOSTS_SETTING = "GATEWAY_TOOL_ALLOWED_HOSTS"

_V4_CLASSES = tuple(
    (ipaddress.IPv4Network(network), label)
    for network, label in (
        ("0.0.0.0/8", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_V6_CLASSES = tuple(
    (ipaddress.IPv6Network(network), label)
    for network, label in (
        ("fe80::/10", "link-local"),
        ("fc00::/7", "private"),
        ("fec0::/10", "private"),
        ("ff00::/8", "multicast"),
    )
)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_INTERNAL_SUFFIXES = (".local", ".localdomain", ".internal", ".svc", ".home.arpa")


def address_class(address: Address) -> str | None:
    """Why ``address`` is refused by default (``"loopback"``, ``"private"``…), or None when it is public."""
    if address.version == 4:
        for network, label in _V4_CLASSES:
            if address in network:
                return label
        return None if address.is_global else "reserved"
    if address == ipaddress.IPv6Address("::"):
        return "unspecified"
    if address == ipaddress.IPv6Address("::1"):
        return "loopback"
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        form, ipv4 = embedded
        label = address_class(ipv4)
        if label is not None:
            return f"{label} ({form} form of {ipv4})"
        return "reserved (IPv4-compatible form)" if form == "IPv4-compatible" else None
    for network, label in _V6_CLASSES:
        if address in network:
            return label
    return None if address.is_global and not address.is_reserved else "reserved"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address in _IPV4_COMPATIBLE:
        return "IPv4-compatible", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    if address in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def host_class(host: str) -> str | None:
    """Why the host name ``host`` is refused by default, or None. IP literals are not names: None."""
    name = host.rstrip(".").lower()
    if _literal(name) is not None:
        return None
    if name == "localhost" or name.endswith(".localhost"):
        return "localhost"
    if "." not in name:
        return "a single-label (cluster-internal) name"
    if name.endswith(_INTERNAL_SUFFIXES):
        return "a cluster-internal name"
    return None


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (``getaddrinfo``), in the resolver's order, without repeats.

    Raises:
        httpcore.ConnectError: The name does not resolve.
    """
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise httpcore.ConnectError(f"{host} does not resolve ({exc})") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class EgressError(Exception):
    """A webhook request that could not be made; the message completes "the <tool> service …"."""


class EgressRefused(EgressError):
    """The policy refuses a destination.

    Attributes:
        subject: What was refused, e.g. ``address 127.0.0.1`` or ``host name 'nats'``.
        reason: Why, e.g. ``loopback``.
        setting: The variable that would allow it, if one can.
        redirected: Whether a redirect led there.
    """

    def __init__(self, subject: str, reason: str, setting: str | None, *, redirected: bool = False) -> None:
        self.subject, self.reason, self.setting, self.redirected = subject, reason, setting, redirected
        super().__init__(self.describe("webhook"))

    def describe(self, service: str) -> str:
        """The refusal as the model reads it, e.g. "the get_order service's address 127.0.0.1 is not
        allowed: loopback (set GATEWAY_TOOL_ALLOWED_NETWORKS to allow it)"."""
        hint = f" (set {self.setting} to allow it)" if self.setting else ""
        if self.redirected:
            return f"the {service} service redirected to {self.subject}, which is not allowed: {self.reason}{hint}"
        return f"the {service} service's {self.subject} is not allowed: {self.reason}{hint}"

    def redirect(self) -> EgressRefused:
        return EgressRefused(self.subject, self.reason, self.setting, redirected=True)


@dataclass(frozen=True)
class Destination:
    """A checked destination: the URL's host (as the transport sees it), its port, the addresses that passed."""

    host: str
    port: int
    addresses: tuple[str, ...]


class EgressPolicy:
    """Which destinations webhook tools may reach.

    Args:
        allowed_networks: CIDRs (or networks) whose addresses pass whatever their class.
        allowed_hosts: Exact host names that pass whatever they resolve to.
        resolver: ``async (host, port) -> addresses``; :func:`resolve` (``getaddrinfo``) by default.
    """

    def __init__(
        self,
        allowed_networks: Iterable[str | Network] = (),
        allowed_hosts: Iterable[str] = (),
        resolver: Resolver | None = None,
    ) -> None:
        self.allowed_networks = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        self.allowed_hosts = frozenset(h.strip().rstrip(".").lower() for h in allowed_hosts if h.strip())
        self._resolve = resolver or resolve

    def _allowed_address(self, address: Address) -> bool:
        forms = [address]
        if address.version == 6 and address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        return any(form in network for form in forms for network in self.allowed_networks)

    async def check(self, url: httpx.URL) -> Destination:
        """Resolves ``url``'s host and checks the name and every address.

        Raises:
            EgressRefused: The name or an address is not allowed.
            httpcore.ConnectError: The name does not resolve.
        """
        if url.scheme not in ("http", "https"):
            raise EgressRefused(f"URL scheme {url.scheme!r}", "only http and https are allowed", None)
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        name = host.rstrip(".").lower()
        host_allowed = name in self.allowed_hosts
        literal = _literal(name)
        if literal is not None:
            addresses = [literal]
        else:
            name_reason = None if host_allowed else host_class(name)
            if name_reason is not None and not self.allowed_networks:
                raise EgressRefused(f"host name {name!r}", name_reason, HOSTS_SETTING)
            addresses = [ipaddress.ip_address(a) for a in await self._resolve(host, port)]
            if not addresses:
                raise httpcore.ConnectError(f"{host} has no address")
            if name_reason is not None and not all(self._allowed_address(a) for a in addresses):
                raise EgressRefused(f"host name {name!r}", name_reason, HOSTS_SETTING)
        if not host_allowed:
            for address in addresses:
                reason = address_class(address)
                if reason is not None and not self._allowed_address(address):
                    raise EgressRefused(f"address {address}", reason, NETWORKS_SETTING)
        return Destination(host, port, tuple(str(a) for a in addresses))
