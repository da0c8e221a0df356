"""Free TCP ports for the servers and process groups masa starts.

A port from bind(0) is ephemeral: until the server that is told to use it binds it, any outgoing
connection on the host (a TCP-store client, gloo's pairs, an HTTP request) may be given the same
port, and the server fails with "address already in use"; bind(0) also returns a port it returned
before. So a port is drawn at random below the kernel's ephemeral range (Linux:
/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default), where the kernel never hands
out ports by itself, checked with a bind, and never handed out twice by one process.
"""
from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

from masa_megatron.errors import UserError

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 20000            # below: well-known services' habits (ssh tunnels, databases, 8xxx)
ATTEMPTS = 500

_given: set[int] = set()
_lock = threading.Lock()
_rng = random.Random()


def _usable_range(count: int) -> tuple[int, int]:
    """[low, high) for a block's first port: below the ephemeral range when it leaves room."""
    try:
        ephemeral_low = int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    if ephemeral_low - count > LOWEST + 1000:
        return LOWEST, ephemeral_low - count
    return LOWEST, 65536 - count        # a host with no room below its ephemeral range


def _candidate(low: int, high: int) -> int:
    return _rng.randrange(low, high)


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """The first of `count` consecutive ports, free on `host` now and not handed out before by
    this process. A wildcard host ("0.0.0.0" or "") checks every interface."""
    low, high = _usable_range(count)
    with _lock:
        for _ in range(ATTEMPTS):
            base = _candidate(low, high)
            block = range(base, base + count)
            if _given.isdisjoint(block) and all(_bindable(host, port) for port in block):
                _given.update(block)
                return base
    raise UserError(f"no {count} consecutive free port(s) on {host or '0.0.0.0'} in "
                    f"[{low}, {high + count - 1}] after {ATTEMPTS} random tries")
