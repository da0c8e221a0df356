"""Simulated nodes: hosts that really are separate to the code under test.

Each node is a network namespace (its own loopback, its own `eth0`, its own routes) entered with
a private hostname (UTS namespace, `unshare --uts`), so 127.0.0.1 and `gethostname()` differ per
node and any single-host assumption breaks. The nodes are joined by a bridge that lives in a hub
namespace of its own, on a private subnet 10.231.<k>.0/24: nothing is routed anywhere else, and
the host's own interfaces are not touched. Each node's /etc/hosts (`ip netns exec` mounts
/etc/netns/<ns>/hosts over it) maps every node's name to its address, and the node's own name
to 127.0.1.1 as Debian's installer does: the classic trap for "my address" lookups.

    with SimulatedNodes(2) as nodes:
        proc = nodes[1].popen([...])          # runs inside node1, hostname "node1"
        nodes[0].run([...]).returncode

Needs root and iproute2 (`ip netns`), util-linux (`unshare`). Everything created is removed on
exit, also when the test fails: processes inside a node are killed, then the namespaces and
their /etc/netns folders are deleted.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

NETNS_ETC = Path("/etc/netns")


def available() -> Optional[str]:
    """None when simulated nodes can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    probe = f"masa-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: Optional[str] = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


@dataclass
class Node:
    name: str          # hostname inside the node: node0, node1, ...
    ns: str            # network namespace
    address: str       # on the simulated network

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this node, under its own hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
                f'hostname {self.name} && exec "$@"', "node-shell", *map(str, argv)]

    def env(self, extra: Optional[dict] = None) -> dict:
        """The environment for a process in this node: gloo and NCCL on the node's interface."""
        return {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0",
                **(extra or {})}

    def popen(self, argv: Sequence[str], env: Optional[dict] = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), env=self.env(env), **kwargs)

    def run(self, argv: Sequence[str], env: Optional[dict] = None, **kwargs):
        return subprocess.run(self.command(argv), env=self.env(env), **kwargs)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


class SimulatedNodes:
    """`count` nodes on one private bridge; a context manager that removes them all."""

    def __init__(self, count: int, *, subnet: Optional[int] = None):
        tag = f"{os.getpid() % 100000}"
        self.subnet = subnet if subnet is not None else 1 + os.getpid() % 250
        self.hub = f"masa-hub-{tag}"
        self.nodes = [Node(f"node{i}", f"masa-n{i}-{tag}", f"10.231.{self.subnet}.{i + 1}")
                      for i in range(count)]

    def __enter__(self) -> list[Node]:
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self.nodes

    def __exit__(self, *exc) -> None:
        self.remove()

    def _create(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        _ip("link", "set", "br0", "up", ns=self.hub)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{n.address} {n.name}\n" for n in self.nodes)
        for i, node in enumerate(self.nodes):
            _ip("netns", "add", node.ns)
            # the pair is made inside the hub, its node end moved into the node and renamed
            _ip("link", "add", f"v{i}", "type", "veth", "peer", "name", f"p{i}", ns=self.hub)
            _ip("link", "set", f"v{i}", "master", "br0", "up", ns=self.hub)
            _ip("link", "set", f"p{i}", "netns", node.ns, ns=self.hub)
            _ip("link", "set", f"p{i}", "name", "eth0", ns=node.ns)
            _ip("addr", "add", f"{node.address}/24", "dev", "eth0", ns=node.ns)
            _ip("link", "set", "eth0", "up", ns=node.ns)
            _ip("link", "set", "lo", "up", ns=node.ns)
            folder = NETNS_ETC / node.ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(hosts + f"127.0.1.1 {node.name}\n")

    def remove(self) -> None:
        for node in self.nodes:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = node.pids() if _exists(node.ns) else []
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 5
                while pids and time.monotonic() < deadline and node.pids():
                    time.sleep(0.1)
            subprocess.run(["ip", "netns", "del", node.ns], capture_output=True)
            shutil.rmtree(NETNS_ETC / node.ns, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.hub], capture_output=True)


def _exists(ns: str) -> bool:
    return Path("/run/netns", ns).exists()
