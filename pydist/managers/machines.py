"""Machine specs: how ``SSHManager`` is told which hosts to start workers on.

A machine is a spec string ``"[user@]host[:port] [bind_addr[:port]]"`` (the ssh part, then
the address the workers there listen on), or a pair ``(spec, count)`` / ``(spec, "auto")``
saying how many workers to start there. Parsing checks everything it can before any ssh
runs, so a typo is a ``ValueError`` naming the spec rather than a failed launch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..net.address import parse_tcp_url

__all__ = ["Machine", "parse_machine"]

_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?\Z")


@dataclass(frozen=True)
class Machine:
    """One parsed machine spec: ``[user@]host[:port] [bind_addr[:port]]`` and a count."""

    spec: str
    host: str
    user: str | None = None
    port: int | None = None
    bind_addr: str | None = None
    bind_port: int | None = None
    count: int | str = 1          # a number of workers, or "auto": the host's CPU count

    @property
    def name(self) -> str:
        """How messages name the host: the ssh part of the spec."""
        return self.spec.split()[0]

    def ssh_target(self) -> list[str]:
        """ssh's arguments that name the host (after every option)."""
        args = ["-p", str(self.port)] if self.port else []
        args += ["-l", self.user] if self.user else []
        return [*args, "--", self.host]


def _split_host_port(spec: str, text: str, what: str) -> tuple[str, int | None]:
    try:
        host, port = parse_tcp_url("tcp://" + text, listen=True)
    except ValueError as e:
        reason = str(e).split(": ", 1)[-1] if ": " in str(e) else str(e)
        raise ValueError(f"machine spec {spec!r}: {what} {text!r} does not parse ({reason}); "
                         f"expected '[user@]host[:port] [bind_addr[:port]]'") from None
    given = text.rpartition("]")[2] if text.startswith("[") else text
    if ":" in given:
        if port == 0:
            raise ValueError(f"machine spec {spec!r}: port 0 in {text!r} is not a port")
        return host, port
    if not text or text.startswith(":"):
        raise ValueError(f"machine spec {spec!r}: {what} {text!r} has no host")
    return host, None


def parse_machine(entry: Any) -> Machine:
    """Parse a machine: a spec string, ``(spec, count)`` or ``(spec, "auto")``."""
    count: Any = 1
    if isinstance(entry, tuple):
        if len(entry) != 2:
            raise ValueError(f"a machine is a spec or a (spec, count) pair, not {entry!r}")
        entry, count = entry
        if count != "auto" and (not isinstance(count, int) or isinstance(count, bool)
                                or count < 1):
            raise ValueError(f"machine {entry!r}: the count must be a positive int or "
                             f"'auto', not {count!r}")
    if not isinstance(entry, str):
        raise TypeError(f"a machine spec must be a str like 'user@host:22', not "
                        f"{type(entry).__name__} ({entry!r})")
    words = entry.split()
    if not 1 <= len(words) <= 2:
        raise ValueError(f"machine spec {entry!r} does not parse: expected "
                         f"'[user@]host[:port] [bind_addr[:port]]'")
    user, at, hostport = words[0].rpartition("@")
    if at and not _USER.match(user):
        raise ValueError(f"machine spec {entry!r}: {user!r} is not a valid user name")
    host, port = _split_host_port(entry, hostport, "host")
    bind_addr = bind_port = None
    if len(words) == 2:
        bind_addr, bind_port = _split_host_port(entry, words[1], "bind address")
    return Machine(entry.strip(), host, user or None, port, bind_addr, bind_port, count)
