"""`irsa-cache init-network`: put the link-local listen addresses on the node.

What the DaemonSet's init container runs (hostNetwork, capability NET_ADMIN), before
`irsa-cache serve` binds 169.254.170.23:80. It adds `169.254.170.23/32`, and with
`--ipv6` `fd00:ec2::23/128`, to a dummy link of its own (`irsa-cache0`), created if
missing; where the kernel has no dummy link type the addresses go on `lo` instead.
It is idempotent: an address already on that link or on `lo` is left as it is, so a
second run changes nothing and succeeds. An address held by any other interface is
an error (exit 1, one line naming both): another agent serves it, and two listeners
on one address would split the pods between them. IPv6 that is missing or disabled
never fails the node: the IPv6 address is skipped with a warning.

Netlink through pyroute2, not `ip` in a subprocess: errors come back as errno codes
to act on, not text to parse, and the image needs no iproute2. pyroute2 is imported
only when the command runs.

Each flag can also come from the environment as `IRSA_CACHE_<FLAG>`, as for `serve`.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import logs
from daemon.config import Option, add_options, parse_bool, parse_choice, read_options
from daemon.errors import ConfigError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

IPV4_ADDRESS = ipaddress.ip_interface("169.254.170.23/32")
IPV6_ADDRESS = ipaddress.ip_interface("fd00:ec2::23/128")
DEFAULT_INTERFACE = "irsa-cache0"
LOOPBACK = "lo"
IFF_UP = 0x1
# What adding an IPv6 address answers when IPv6 is off: disabled on the link
# (net.ipv6.conf.*.disable_ipv6=1), or not in the kernel at all.
IPV6_OFF_ERRNOS = frozenset({errno.EACCES, errno.EAFNOSUPPORT, errno.EOPNOTSUPP})

IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def parse_interface_name(text: str) -> str:
    # The kernel's rule (dev_valid_name): 1..15 bytes, no '/', ':' or whitespace, not '.' or '..'.
    if not re.fullmatch(r"[^/:\s]{1,15}", text) or text in (".", ".."):
        raise ValueError(f"{text!r} is not an interface name (1 to 15 characters, no '/', ':' or spaces)")
    return text


NETWORK_OPTIONS: tuple[Option, ...] = (
    Option("--interface", parse_interface_name, DEFAULT_INTERFACE,
           "dummy link to hold the addresses, created if missing; where the kernel has no dummy link type "
           "they go on lo, and 'lo' puts them there always", metavar="NAME"),
    Option("--ipv6", parse_bool, "false",
           f"also add {IPV6_ADDRESS} (skipped with a warning where IPv6 is missing or disabled)", flag_only=True),
    Option("--handoff-dir", Path, None,
           "also create this directory for `serve --handoff-socket` (a host path both generations of the "
           "daemon mount), owned by --handoff-uid, mode 0700 (needs CAP_CHOWN)", metavar="DIR"),
    Option("--handoff-uid", int, "65532", "the daemon's uid, which owns --handoff-dir", metavar="UID"),
    Option("--log-level", parse_choice("debug", "info", "warning", "error"), "info", "log level"),
)


@dataclass(frozen=True, kw_only=True)
class NetworkSettings:
    interface: str
    addresses: tuple[IpInterface, ...]
    log_level: str = "info"
    handoff_dir: Path | None = None
    handoff_uid: int = 65532


class NetworkSetupError(Exception):
    """The node's network cannot be set up as asked; the message is one line."""

    def __init__(self, message: str, **fields: str) -> None:
        super().__init__(message)
        self.fields = fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, NETWORK_OPTIONS)


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> NetworkSettings:
    """Flags, then `IRSA_CACHE_*` variables, then defaults; every bad value reported."""
    values = read_options(NETWORK_OPTIONS, args, environ)
    return NetworkSettings(
        interface=values["interface"],
        addresses=(IPV4_ADDRESS, IPV6_ADDRESS) if values["ipv6"] else (IPV4_ADDRESS,),
        log_level=values["log_level"],
        handoff_dir=values["handoff_dir"],
        handoff_uid=values["handoff_uid"],
    )


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"irsa-cache: error: {problem}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    try:
        set_up(settings)
        if settings.handoff_dir is not None:
            prepare_handoff_dir(settings.handoff_dir, settings.handoff_uid)
    except NetworkSetupError as exc:
        log.error("%s", exc, extra=exc.fields)
        return 1
    return 0


def prepare_handoff_dir(directory: Path, uid: int) -> None:
    """The directory where generations of the daemon meet for a handoff: the daemon's
    alone (its uid, mode 0700), since what crosses it are listening sockets and credentials."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, uid, uid)
        directory.chmod(0o700)
    except OSError as exc:
        hint = " (the init container needs CAP_CHOWN)" if exc.errno == errno.EPERM else ""
        raise NetworkSetupError(f"handoff directory {directory}: {exc.strerror}{hint}", path=str(directory)) from exc
    log.info("handoff directory %s ready for uid %d", directory, uid)


def set_up(settings: NetworkSettings) -> None:
    """Put `settings.addresses` on the node; raise NetworkSetupError if that cannot be done."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            _NodeNetwork(ipr, settings).apply()
    except NetlinkError as exc:  # one not handled where it happened: still one line
        raise NetworkSetupError(f"netlink: {_strerror(exc)}{_capability_hint(exc)}") from exc


class _NodeNetwork:
    def __init__(self, ipr: IPRoute, settings: NetworkSettings) -> None:
        self.ipr = ipr
        self.settings = settings
        self.ours = {settings.interface, LOOPBACK}
        self.names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        self.target: tuple[int, str] | None = None  # the link new addresses go on, once chosen

    def apply(self) -> None:
        self._check_interface()
        held = self._holders()
        # Every conflict is found before anything changes.
        for wanted in self.settings.addresses:
            for name, _ in held.get(wanted.ip, []):
                if name not in self.ours:
                    raise NetworkSetupError(
                        f"{wanted.ip} is already assigned to interface {name} (not {self.settings.interface} "
                        f"or {LOOPBACK}): another agent serves this address, e.g. the EKS Pod Identity Agent "
                        f"on pod-id-link0; remove it from {name} or stop that agent first",
                        address=str(wanted.ip), interface=name,
                    )
        placed: list[str] = []
        for wanted in self.settings.addresses:
            here = held.get(wanted.ip, [])
            if here:
                name, prefixlen = here[0]
                self.target = (self._index(name), name)  # a new address joins the ones already placed
                self._ensure_up(*self.target)
                if prefixlen != wanted.network.prefixlen:
                    log.warning("%s is on %s as /%d, not /%d; left as it is", wanted.ip, name, prefixlen,
                                wanted.network.prefixlen, extra={"address": str(wanted), "interface": name})
                else:
                    log.info("%s is already on %s", wanted, name,
                             extra={"address": str(wanted), "interface": name, "changed": False})
                placed.append(f"{wanted} on {name}")
            elif self._add(wanted):
                placed.append(f"{wanted} on {self.target[1]}")  # type: ignore[index]
        log.info("node network ready: %s", ", ".join(placed), extra={"addresses": placed})

    def _check_interface(self) -> None:
        """Our interface is lo, or a dummy link (ours from an earlier run), or not there yet."""
        name = self.settings.interface
        if name == LOOPBACK or not self.ipr.link_lookup(ifname=name):
            return
        info = self.ipr.get_links(ifname=name)[0].get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "dummy":
            raise NetworkSetupError(
                f"interface {name} exists and is {f'a {kind} link' if kind else 'no dummy link'}; "
                "irsa-cache puts its addresses on a dummy link of its own: choose another --interface",
                interface=name,
            )

    def _holders(self) -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address, list[tuple[str, int]]]:
        held: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, list[tuple[str, int]]] = {}
        for message in self.ipr.get_addr():
            # IFA_LOCAL is the local end on a point-to-point link, where IFA_ADDRESS is the peer.
            text = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
            if not text:
                continue
            name = self.names.get(message["index"], f"#{message['index']}")
            held.setdefault(ipaddress.ip_address(text), []).append((name, message["prefixlen"]))
        return held

    def _index(self, name: str) -> int:
        (index,) = self.ipr.link_lookup(ifname=name)
        return int(index)

    def _add(self, wanted: IpInterface) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError

        if wanted.version == 6 and not os.path.isdir("/proc/sys/net/ipv6"):
            self._ipv6_off(wanted, "IPv6 is not available in this kernel")
            return False
        index, name = self._target()
        try:
            self.ipr.addr("add", index=index, address=str(wanted.ip), prefixlen=wanted.network.prefixlen)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:  # another run got there first
                log.info("%s is already on %s", wanted, name,
                         extra={"address": str(wanted), "interface": name, "changed": False})
                return True
            if wanted.version == 6 and exc.code in IPV6_OFF_ERRNOS:
                self._ipv6_off(wanted, f"IPv6 is disabled on {name} ({_strerror(exc)}; "
                                       f"net.ipv6.conf.{name}.disable_ipv6 is probably 1)")
                return False
            raise NetworkSetupError(
                f"cannot add {wanted} to {name}: {_strerror(exc)}{_capability_hint(exc)}",
                address=str(wanted), interface=name,
            ) from exc
        log.info("added %s to %s", wanted, name, extra={"address": str(wanted), "interface": name, "changed": True})
        return True

    def _ipv6_off(self, wanted: IpInterface, why: str) -> None:
        log.warning("%s: %s not added; pods reach the daemon over IPv4 only", why, wanted,
                    extra={"address": str(wanted)})

    def _target(self) -> tuple[int, str]:
        """The link new addresses go on: ours (created if missing), or lo without the dummy type."""
        if self.target is None:
            name = self._ensure_dummy(self.settings.interface)
            index = self._index(name)
            self._ensure_up(index, name)
            self.target = (index, name)
        return self.target

    def _ensure_dummy(self, name: str) -> str:
        from pyroute2.netlink.exceptions import NetlinkError

        if name == LOOPBACK:
            return name
        if self.ipr.link_lookup(ifname=name):  # a dummy link: _check_interface() saw to that
            return name
        try:
            self.ipr.link("add", ifname=name, kind="dummy")
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:  # another run created it meanwhile
                return self._ensure_dummy(name)
            if exc.code == errno.EOPNOTSUPP:  # no dummy driver in this kernel, nor as a module
                log.warning("the kernel has no dummy link type; putting the addresses on %s", LOOPBACK,
                            extra={"interface": LOOPBACK})
                return LOOPBACK
            raise NetworkSetupError(
                f"cannot create dummy link {name}: {_strerror(exc)}{_capability_hint(exc)}", interface=name
            ) from exc
        log.info("created dummy link %s", name, extra={"interface": name, "changed": True})
        return name

    def _ensure_up(self, index: int, name: str) -> None:
        (link,) = self.ipr.get_links(index)
        if link["flags"] & IFF_UP:
            return
        self.ipr.link("set", index=index, state="up")
        log.info("set %s up", name, extra={"interface": name, "changed": True})


def _strerror(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)


def _capability_hint(exc: Exception) -> str:
    if getattr(exc, "code", None) == errno.EPERM:
        return " (the init container needs the NET_ADMIN capability)"
    return ""
