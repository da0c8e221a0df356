"""Free TCP ports for the servers and process groups masa starts.

A port from bind(0) is ephemeral: until the server that is told to use it binds it, any outgoing
connection on the host (a TCP-store client, gloo's pairs, an HTTP request) may be given the same
port, and the server fails with "address already in use"; bind(0) also returns a port it returned
before. So a port is drawn at random below the kernel's ephemeral range (Linux:
/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default), where the kernel never hands
out ports by itself (or above it, on a host whose range leaves too little room below), checked
with a bind on every interface (a server or TCP store listening on all of them conflicts with a
port held on any one address), and never handed out twice by one process.
"""
from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

from masa_megatron.errors import UserError

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 20000            # below: well-known services' habits (ssh tunnels, databases, 8xxx)
ROOM = 1000               # fewest ports worth drawing from
ATTEMPTS = 500

_given: set[int] = set()
_lock = threading.Lock()
_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)     # forked children draw their own ports


def ephemeral_range() -> tuple[int, int]:
    """The kernel's [first, last] ephemeral port (Linux's default where it cannot be read)."""
    try:
        first, last = map(int, RANGE_FILE.read_text().split()[:2])
        return first, last
    except (OSError, ValueError):
        return 32768, 60999


def _usable_range(count: int) -> tuple[int, int]:
    """[low, high) for a block's first port, outside the ephemeral range: below it, else above
    it, else (a host whose range covers nearly everything) anywhere above LOWEST."""
    first, last = ephemeral_range()
    if first - count > LOWEST + ROOM:
        return LOWEST, first - count + 1
    if 65536 - count > last + 1 + ROOM:
        return last + 1, 65536 - count
    return LOWEST, 65536 - count


def _candidate(low: int, high: int) -> int:
    return _rng.randrange(low, high)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive ports, free on every IPv4 interface now and not handed
    out before by this process."""
    low, high = _usable_range(count)
    with _lock:
        for _ in range(ATTEMPTS):
            base = _candidate(low, high)
            block = range(base, base + count)
            if _given.isdisjoint(block) and all(_bindable(port) for port in block):
                _given.update(block)
                return base
    raise UserError(f"no {count} consecutive free port(s) in [{low}, {high + count - 2}] "
                    f"after {ATTEMPTS} random tries")
