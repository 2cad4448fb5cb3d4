"""Ports for the processes a test or the benchmark starts."""

from __future__ import annotations

import socket

from parley_kit.testing import free_ports


def test_free_ports_are_distinct_and_bindable() -> None:
    """A platform's ports come from one call: none repeats (two services on one port pass each other's readiness
    check), and each can be listened on once the call returns. 200 picks: picked one at a time, about half of such
    runs see a repeat."""
    for _ in range(200):
        ports = free_ports(12)
        assert len(set(ports)) == 12
    listeners = []
    try:
        for port in ports:
            listener = socket.socket()
            listeners.append(listener)
            listener.bind(("127.0.0.1", port))
            listener.listen()
    finally:
        for listener in listeners:
            listener.close()
