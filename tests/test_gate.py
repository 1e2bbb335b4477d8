"""The start gate of a local launch (hpc_mto.gate): what a waiting task decides."""

import os
import subprocess
import sys
import threading
import time

import pytest

from hpc_mto import gate


@pytest.fixture
def at_gate(monkeypatch):
    g = gate.Gate()
    for key, value in g.environ().items():
        monkeypatch.setenv(key, value)
    yield g
    g.remove()


def test_outside_a_gated_launch_a_task_goes_straight_in(monkeypatch):
    monkeypatch.delenv(gate.GATE_ENV, raising=False)
    assert gate.wait() is True


def test_a_task_waits_until_the_gate_opens(at_gate):
    t0 = time.monotonic()
    threading.Timer(0.5, at_gate.open).start()
    assert gate.wait() is True
    assert time.monotonic() - t0 >= 0.5  # it did not go in before the gate opened


def test_a_closed_gate_sends_the_task_away(at_gate):
    at_gate.close()
    assert gate.wait() is False


def test_a_task_leaves_when_its_launcher_is_gone(at_gate, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    monkeypatch.setenv(gate.LAUNCHER_ENV, str(dead.pid))
    assert gate.wait() is False
    assert sorted(os.listdir(at_gate.path)) == []  # neither open nor closed: it left because of the launcher
