"""The ports masa picks for servers and process groups (the SGLang launcher, the rehearsal's
servers, the weight-sync group) lie outside the kernel's ephemeral range (below it by default).

A port from bind(0) is an ephemeral one: between the pick and the server's own bind, any outgoing
connection of this or another process (a TCP-store client, gloo's pairs, an HTTP request) may be
given it, and the server then fails with "address already in use". That is how CI failed on
2026-12-03: the stand-in server of tests/test_sglang_standin_model.py lost its port while the test
process set up its process group.
"""
import importlib
import os
import socket

import pytest

USERS = ["masa_megatron.rehearsal.run", "masa_megatron.rollout.weight_sync.broadcast"]


def _outside_ephemeral_range():
    """A check that a port lies outside this host's ephemeral range (skips where the range
    leaves no room outside it)."""
    from masa_megatron import ports

    if not ports.RANGE_FILE.exists():
        pytest.skip("no Linux ephemeral port range to compare with")
    first, last = ports.ephemeral_range()
    if first < 21024 and last > 64534:
        pytest.skip(f"the ephemeral range {first}-{last} leaves no room outside it")
    return lambda port: 1024 <= port and not first <= port <= last


@pytest.mark.parametrize("module", USERS)
def test_servers_and_groups_take_their_ports_from_the_one_picker(module):
    from masa_megatron.ports import free_port

    assert importlib.import_module(module).free_port is free_port


def test_picked_ports_lie_outside_the_ephemeral_range():
    from masa_megatron.ports import free_port

    outside = _outside_ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert all(outside(port) for port in ports), ports


def test_a_process_never_hands_out_a_port_twice():
    from masa_megatron.ports import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_a_block_of_consecutive_ports_is_free_and_outside_the_ephemeral_range():
    from masa_megatron.ports import free_port

    outside = _outside_ephemeral_range()
    base = free_port(count=4)
    assert all(outside(port) for port in range(base, base + 4)), base
    for port in range(base, base + 4):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))      # raises if it was not free


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
        assert ports.free_port() == free


@pytest.mark.parametrize("kernel_range, expected", [
    ("32768\t60999", (20000, 32768 - 3)),      # Linux's default: below
    ("15000\t60999", (61000, 65536 - 4)),      # no room below: above
    ("1024\t65535", (20000, 65536 - 4)),       # no room outside: anywhere above 20000
])
def test_the_drawing_range_avoids_the_kernels_ephemeral_range(tmp_path, monkeypatch,
                                                              kernel_range, expected):
    from masa_megatron import ports

    (tmp_path / "range").write_text(kernel_range + "\n")
    monkeypatch.setattr(ports, "RANGE_FILE", tmp_path / "range")
    assert ports._usable_range(4) == expected
