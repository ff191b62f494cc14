"""The systemd unit in README works as written (issue 20, point 6): its ExecStart, with the
paths of this machine put in, runs `replicator run` under systemd's notify protocol: READY=1
once replicating, the watchdog fed while running, STOPPING=1 on SIGTERM, exit 0; and
RestartPreventExitStatus matches the exit status of a configuration error."""
from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness import REPO, make_setup

SCHEMA = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);"
CATALOGS = {"items": {"label": "Items", "default": True, "tables": ["public.items"]}}


def readme_unit() -> configparser.ConfigParser:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"A systemd unit for a branch.*?```ini\n(.*?)```", text, re.S).group(1)
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str                     # systemd keys are case-sensitive
    unit.read_string(block)
    return unit


def listen(tmp_path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.2)
    return sock


def messages(sock: socket.socket, until: float) -> list[str]:
    out = []
    while time.monotonic() < until:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    return out


def wait_message(sock: socket.socket, text: str, timeout: float, proc: subprocess.Popen) -> list[str]:
    seen = []
    deadline = time.monotonic() + timeout
    while not any(text in m for m in seen):
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s; got {seen}"
        assert proc.poll() is None or text == "STOPPING=1", f"run exited {proc.returncode}"
        seen += messages(sock, time.monotonic() + 0.2)
    return seen


@pytest.fixture
def branch(tmp_path, hq, branch_a):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    hq.execute("INSERT INTO items VALUES (1, 'one')")
    b = s.add_branch("service", branch_a, poll_interval="50ms")
    b.init()
    return b


def test_the_readme_unit_runs_replicator_under_the_notify_protocol(tmp_path, branch, hq):
    unit = readme_unit()
    service = unit["Service"]
    assert service["Type"] == "notify" and "WatchdogSec" in service
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/.venv/bin/replicator") and argv[1:3] == ["run", "-c"]
    # as written, with this machine's interpreter for the venv's script and the test's branch.yaml
    argv = [sys.executable, "-m", "replicator", *[str(branch.path) if a == argv[3] else a for a in argv[1:]]]
    sock = listen(tmp_path)
    watchdog_sec = 1.0
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": str(int(watchdog_sec * 1e6))}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = wait_message(sock, "READY=1", 20, proc)
        assert any("STATUS=replicating 1 tables" in m for m in seen), seen
        fed = [m for m in messages(sock, time.monotonic() + 3 * watchdog_sec) if m == "WATCHDOG=1"]
        assert len(fed) >= 4, f"watchdog fed {len(fed)} times in {3 * watchdog_sec} s"   # every half interval
        hq.execute("INSERT INTO items VALUES (2, 'two')")
        proc.send_signal(signal.SIGTERM)
        wait_message(sock, "STOPPING=1", 10, proc)
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sock.close()


def test_the_unit_does_not_restart_a_configuration_error(tmp_path, branch):
    """Restart=always would retry a broken branch.yaml every RestartSec for ever; the exit
    status of a configuration error is the one the unit lists in RestartPreventExitStatus."""
    service = readme_unit()["Service"]
    assert service["Restart"] == "always"
    bad = tmp_path / "bad.yaml"
    bad.write_text(branch.path.read_text() + "catalogs: [no_such_catalog]\n")
    r = subprocess.run([sys.executable, "-m", "replicator", "run", "-c", str(bad)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and str(r.returncode) in service["RestartPreventExitStatus"].split(), r.stderr
    # and a failure that may heal (HQ away) is not in it, so systemd keeps trying
    assert "1" not in service["RestartPreventExitStatus"].split()
