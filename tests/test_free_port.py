"""The ports masa picks for servers and process groups (the SGLang launcher, the rehearsal's
servers, the weight-sync group) lie below the kernel's ephemeral range.

A port from bind(0) is an ephemeral one: between the pick and the server's own bind, any outgoing
connection of this or another process (a TCP-store client, gloo's pairs, an HTTP request) may be
given it, and the server then fails with "address already in use". That is how CI failed on
2026-12-03: the stand-in server of tests/test_sglang_standin_model.py lost its port while the test
process set up its process group.
"""
import importlib
import os
import socket
from pathlib import Path

import pytest

USERS = ["masa_megatron.rehearsal.run", "masa_megatron.rollout.weight_sync.broadcast"]
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    if not RANGE_FILE.exists():
        pytest.skip("no Linux ephemeral port range to compare with")
    return int(RANGE_FILE.read_text().split()[0])


@pytest.mark.parametrize("module", USERS)
def test_servers_and_groups_take_their_ports_from_the_one_picker(module):
    from masa_megatron.ports import free_port

    assert importlib.import_module(module).free_port is free_port


def test_picked_ports_lie_below_the_ephemeral_range():
    from masa_megatron.ports import free_port

    low = _ephemeral_low()
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= port < low for port in ports), (low, ports)


def test_a_process_never_hands_out_a_port_twice():
    from masa_megatron.ports import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_a_block_of_consecutive_ports_is_free_and_below_the_ephemeral_range():
    from masa_megatron.ports import free_port

    low = _ephemeral_low()
    base = free_port(count=4)
    assert base + 4 <= low
    for port in range(base, base + 4):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))      # raises if it was not free


def test_a_port_in_use_is_never_picked(monkeypatch):
    from masa_megatron import ports

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        choices = iter([taken, free])
        monkeypatch.setattr(ports, "_candidate", lambda low, high: next(choices))
        monkeypatch.setattr(ports, "_usable_range", lambda count: (1024, 65536 - count))
        assert ports.free_port() == free


def test_a_one_process_group_takes_no_port():
    """`init_parallel` outside torchrun (masa train on one device, the stand-in servers, convert)
    needs no TCP store: a port it picked could be a sibling server's, picked by another process
    and not yet bound."""
    import subprocess
    import sys

    script = (
        "import masa_megatron.ports as ports, masa_megatron.parallel as parallel\n"
        "def refuse(*args, **kwargs):\n"
        "    raise AssertionError('a one-process group asked for a port')\n"
        "ports.free_port = parallel.free_port = refuse\n"
        "from masa_megatron.config import ParallelConfig\n"
        "layout = parallel.init_parallel(ParallelConfig())\n"
        "assert (layout.world_size, layout.dp_size) == (1, 1), layout\n"
        "parallel.destroy_parallel()\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_port_in_use_on_any_local_address_is_never_picked(monkeypatch):
    """The weight-sync group's TCP store listens on every interface, whatever address its
    senders name: a port another process holds on 127.0.0.1 only is not free for it."""
    from masa_megatron import ports

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        choices = iter([taken, free])
        monkeypatch.setattr(ports, "_candidate", lambda low, high: next(choices))
        monkeypatch.setattr(ports, "_usable_range", lambda count: (1024, 65536 - count))
        assert ports.free_port("127.0.0.2") == free     # as broadcast.py asks, for its address
