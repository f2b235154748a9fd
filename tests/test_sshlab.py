"""Smoke tests of the SSH lab (tests/sshlab.py): the hosts look like hosts, and no trace or
packet of the lab outlives it."""

from __future__ import annotations

import json
import os
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sshlab
from sshlab import SSHLab, SSHLabError

pytestmark = pytest.mark.timeout(120)

# Runs on a lab host: listen on (argv[1], 0), print the port, answer one connection with
# the hostname.
_LISTENER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.sendall(socket.gethostname().encode())
c.close()
"""


def _require_lab() -> None:
    ok, reason = SSHLab.available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SSH tests: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def lab() -> Iterator[SSHLab]:
    _require_lab()
    with SSHLab(n_hosts=2) as lab:
        yield lab


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no line from {proc.args} within {timeout} s")
    return proc.stdout.readline().strip()


def _start_listener(lab: SSHLab, host: sshlab.LabHost,
                    bind: str) -> tuple[subprocess.Popen[str], int]:
    command = f"{lab.python} -c {shlex.quote(_LISTENER)} {bind}"
    proc = subprocess.Popen(["ssh", *lab.sshflags, host.spec, command], text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    return proc, int(_read_line(proc, 20))


def _receive(addr: str, port: int, timeout: float = 10) -> str:
    with socket.create_connection((addr, port), timeout=timeout) as sock:
        chunks = []
        while chunk := sock.recv(1024):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def _finish(proc: subprocess.Popen[str]) -> None:
    try:
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _root_state() -> tuple[str, str, str]:
    ip = lambda *a: subprocess.run(["ip", *a], capture_output=True, text=True,  # noqa: E731
                                   timeout=10).stdout
    return ip("netns", "list"), ip("link", "show"), ip("route", "show", "table", "all")


def _assert_nothing_left(lab_id: str, subnet: str, pids: list[int]) -> None:
    netns, links, routes = _root_state()
    assert f"pdlab-{lab_id}" not in netns
    assert f"pdlab{lab_id}" not in links
    assert subnet.rsplit(".", 1)[0] + "." not in routes, routes
    alive = [p for p in pids if sshlab._start_time(p) and _state(p) not in ("Z", "X")]
    assert not alive, f"lab processes still running: {alive}"
    assert not (sshlab._STATE_DIR / f"{lab_id}.json").exists()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "X"


# ---------------------------------------------------------------------- the hosts


def test_each_host_has_its_own_hostname(lab: SSHLab) -> None:
    names = [lab.ssh(h, "hostname", timeout=20).stdout.strip() for h in lab.hosts]
    assert names == [h.name for h in lab.hosts] == ["pdhost-a", "pdhost-b"]
    assert socket.gethostname() not in names


def test_dev_shm_is_private_to_each_host(lab: SSHLab) -> None:
    a, b = lab.hosts
    name = f"/dev/shm/pdlab-probe-{os.getpid()}"
    assert lab.ssh(a, f"touch {name} && test -e {name}", timeout=20).returncode == 0
    try:
        assert lab.ssh(b, f"test -e {name}", timeout=20).returncode == 1
        assert not os.path.exists(name)
    finally:
        lab.ssh(a, f"rm -f {name}", timeout=20)


def test_the_interpreter_runs_on_the_hosts(lab: SSHLab) -> None:
    done = lab.ssh(lab.hosts[0], f"{lab.python} -c 'import socket, sys; "
                   f"print(socket.gethostname(), sys.executable)'", timeout=30)
    assert done.stdout.split() == ["pdhost-a", lab.python], done.stderr


def test_a_host_reaches_another_hosts_sshd(lab: SSHLab) -> None:
    a, b = lab.hosts
    done = lab.ssh(a, f"ssh -F {lab.ssh_config_path} {b.spec} hostname", timeout=30)
    assert done.stdout.strip() == "pdhost-b", done.stderr


def test_the_root_namespace_reaches_any_port_on_a_host(lab: SSHLab) -> None:
    host = lab.hosts[0]
    proc, port = _start_listener(lab, host, host.addr)
    try:
        assert port != 22
        assert _receive(host.addr, port) == "pdhost-a"
    finally:
        _finish(proc)


def test_local_port_forwarding_reaches_the_hosts_loopback(lab: SSHLab) -> None:
    host = lab.hosts[1]
    proc, remote_port = _start_listener(lab, host, "127.0.0.1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    tunnel = subprocess.Popen(
        ["ssh", *lab.sshflags, "-N", "-o", "ExitOnForwardFailure=yes",
         "-L", f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}", host.spec],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert tunnel.poll() is None, tunnel.stderr.read() if tunnel.stderr else ""
            try:
                # Port 127.0.0.1:remote_port of the root namespace is not the host's.
                assert _receive("127.0.0.1", local_port) == "pdhost-b"
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the tunnel never listened"
                time.sleep(0.05)
    finally:
        tunnel.kill()
        tunnel.wait(5)
        _finish(proc)


def test_one_multiplexed_connection_carries_more_than_ten_sessions(
        lab: SSHLab, tmp_path: Path) -> None:
    host, control = lab.hosts[0], str(tmp_path / "control")
    master = subprocess.Popen(["ssh", *lab.sshflags, "-M", "-S", control, "-N", host.spec],
                              stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(control):
            assert master.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        sessions = [subprocess.Popen(["ssh", *lab.sshflags, "-S", control, host.spec,
                                      "sleep 1; hostname"], text=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
                    for _ in range(16)]
        outputs = [s.communicate(timeout=30)[0].strip() for s in sessions]
        assert outputs == ["pdhost-a"] * 16
    finally:
        master.kill()
        master.wait(5)


def test_processes_in_sees_the_hosts_sshd_only(lab: SSHLab) -> None:
    a, b = lab.hosts
    assert lab._sshd[a.name].pid in lab.processes_in(a)
    assert lab._sshd[a.name].pid not in lab.processes_in(b)
    assert os.getpid() not in lab.processes_in(a)


# ---------------------------------------------------------------------- special addresses


def test_the_silent_address_swallows_packets(lab: SSHLab) -> None:
    start = time.monotonic()
    done = lab.ssh(lab.silent_addr, "true", timeout=30, options=["-o", "ConnectTimeout=3"])
    elapsed = time.monotonic() - start
    assert done.returncode == 255
    assert "timed out" in done.stderr, done.stderr
    assert 2.5 < elapsed < 15


def test_the_dead_address_fails_fast(lab: SSHLab) -> None:
    start = time.monotonic()
    done = lab.ssh(lab.dead_addr, "true", timeout=30, options=["-o", "ConnectTimeout=20"])
    elapsed = time.monotonic() - start
    assert done.returncode == 255
    assert "No route to host" in done.stderr or "refused" in done.stderr, done.stderr
    assert elapsed < 10


# ---------------------------------------------------------------------- the guard


def test_the_subnet_never_takes_the_default_route(lab: SSHLab) -> None:
    assert lab.subnet is not None
    root_link = f"pdlab{lab.lab_id}"
    routes = subprocess.run(["ip", "route", "show", str(lab.subnet)], capture_output=True,
                            text=True, timeout=10).stdout
    assert f"unreachable {lab.subnet} metric 4242" in routes
    unused = str(lab.subnet.network_address + 200)
    for addr in (unused, lab.silent_addr, lab.dead_addr):
        got = subprocess.run(["ip", "route", "get", addr], capture_output=True, text=True,
                             timeout=10)
        assert got.returncode == 0 and f"dev {root_link}" in got.stdout, got
        assert " via " not in got.stdout


# ---------------------------------------------------------------------- lifecycle


def test_kill_sshd_and_teardown_leave_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_lab()
    calls: list[list[str]] = []
    real_run = sshlab._run

    def recording_run(argv, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(list(argv))
        return real_run(argv, **kwargs)

    monkeypatch.setattr(sshlab, "_run", recording_run)
    with SSHLab(n_hosts=1) as lab:
        host = lab.hosts[0]
        lab_id, subnet = lab.lab_id, str(lab.subnet)
        tmpdir = str(Path(lab.ssh_config_path).parent)
        # A session that outlives sshd, a detached process, and an idle socket from here.
        session = subprocess.Popen(["ssh", *lab.sshflags, host.spec, "sleep 300"],
                                   stdin=subprocess.DEVNULL)
        assert lab.ssh(host, "setsid sleep 300 >/dev/null 2>&1 < /dev/null &",
                       timeout=20).returncode == 0
        lab.kill_sshd(host)
        refused = lab.ssh(host, "true", timeout=20)
        assert refused.returncode == 255 and "refused" in refused.stderr, refused.stderr
        pids = lab.processes_in(host)
        assert len(pids) >= 2 and session.poll() is None  # the old session lives on
        lab.start_sshd(host)
        assert lab.ssh(host, "hostname", timeout=20).stdout.strip() == "pdhost-a"
        pids += lab.processes_in(host)
        calls.clear()
    lab.close()  # idempotent
    session.wait(10)
    _assert_nothing_left(lab_id, subnet, pids)
    assert not os.path.exists(tmpdir)
    mutations = [c for c in calls if c[:2] in (["ip", "route"], ["ip", "link"], ["ip", "netns"])
                 and c[2] in ("add", "del")]
    assert mutations[-1] == ["ip", "route", "del", "unreachable", subnet, "metric", "4242"]


def test_a_failed_setup_takes_down_what_it_built(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_lab()
    monkeypatch.setattr(sshlab, "SSHD", "/bin/false")
    lab = SSHLab(n_hosts=2)
    with pytest.raises(SSHLabError, match="sshd on pdhost-a .* exited"):
        lab.start()
    lab_id = lab.hosts[0].netns.split("-")[1]
    _assert_nothing_left(lab_id, str(lab.subnet), [])
    lab.close()


def test_a_lab_whose_process_died_is_cleaned_up_by_the_next() -> None:
    _require_lab()
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from sshlab import SSHLab; "
              "lab = SSHLab(n_hosts=1); lab.start(); "
              "print(lab.lab_id, lab.subnet, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent)],
                            text=True, stdout=subprocess.PIPE)
    try:
        lab_id, subnet = _read_line(proc, 30).split()
        state = json.loads((sshlab._STATE_DIR / f"{lab_id}.json").read_text())
        assert state["subnet"] == subnet
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    _, _, routes = _root_state()
    assert f"unreachable {subnet}" in routes  # the guard outlives a crash
    assert lab_id in SSHLab.cleanup_stale()
    _assert_nothing_left(lab_id, subnet, [])
