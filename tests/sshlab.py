"""A lab of SSH hosts made of Linux network namespaces, for the tests of ``SSHManager``.

Every "host" is a network namespace with its own address, an OpenSSH server, its own
hostname (UTS namespace) and its own ``/dev/shm`` (a private tmpfs in a mount namespace).
The filesystem is otherwise shared, so the current interpreter (``lab.python``) runs on
every host. The pid namespace is shared too: a kill by pid from the test process reaches a
"remote" process, so such a kill proves nothing about remote shutdown.

The shape (``X`` random per lab, ``<id>`` six random hex digits)::

    root namespace: pytest and the pydist master
      route  unreachable 10.250.X.0/24 metric 4242        the guard: added first, removed last
      link   pdlab<id>  10.250.X.1/24                      lab.master_addr; IPv4 forwarding off,
        |                                                  IPv6 off
    namespace pdlab-<id>: no address, no route, a bridge only
      br0 -- vroot
          -- vh0 == eth0 of pdlab-<id>-a  10.250.X.11  sshd, hostname pdhost-a
          -- vh1 == eth0 of pdlab-<id>-b  10.250.X.12  sshd, hostname pdhost-b
    10.250.X.250  lab.silent_addr: a permanent neighbour entry (in the root and every host
                  namespace) to a MAC address nobody has; frames are flooded on the bridge
                  and dropped by every port, so a TCP connect hangs until its own timeout
    10.250.X.251  lab.dead_addr: nothing; ARP gets no answer and a connect fails after about
                  3 s with "No route to host"

Why no packet can leave the machine:

1. The test process stays in the root namespace, which has a default route off the machine.
   Before anything is created, the guard route ``unreachable 10.250.X.0/24 metric 4242``
   is added there. From then on a packet to the subnet takes the connected route of the
   lab link or, when that link is gone, the guard: it is dropped, never sent to the
   default gateway. Adding the guard is also the lock on the subnet: a second lab that
   picks the same ``X`` fails to add it and picks again.
2. The lab and host namespaces have no route but their own on-link /24 and no link but the
   bridge: they cannot even name an address off the machine.
3. The root end of the lab link has IPv4 forwarding and IPv6 switched off, so nothing
   arriving from the lab is routed onwards by the root namespace.
4. Teardown ends every process in the lab namespaces, aborts the root namespace's sockets
   to the subnet (``ss -K``), deletes the links and namespaces, checks that no socket or
   route to the subnet is left, and only then removes the guard. If a socket survives,
   the guard stays and ``close`` raises.

A lab killed before its teardown leaves its guard route (harmless) and its namespaces; the
next lab removes them (``SSHLab.cleanup_stale``), guided by a state file in
``/run/pydist-sshlab``.

The re-exec of the test process under ``unshare --net`` was not chosen: it would move the
whole pytest session (and every other test) into the lab.

This module imports nothing from pytest, so a benchmark can use it too::

    with SSHLab(n_hosts=2) as lab:
        print(lab.ssh(lab.hosts[0], "hostname").stdout)
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["LabHost", "SSHLab", "SSHLabError"]

SSHD = "/usr/sbin/sshd"
GUARD_METRIC = 4242
SSH_PORT = 22
_BASE = ipaddress.ip_network("10.250.0.0/16")
_SUBNETS = list(_BASE.subnets(new_prefix=24))[1:-1]  # 10.250.1.0/24 .. 10.250.254.0/24
_PREFIX = "pdlab"
_STATE_DIR = Path("/run/pydist-sshlab")
_FIRST_HOST = 11
_SILENT = 250
_DEAD = 251
_MAX_HOSTS = _SILENT - _FIRST_HOST
_TOOLS = ("ip", "unshare", "ss", "mount", "ssh", "ssh-keygen")

# Runs under `ip netns exec <ns> unshare --uts --mount`: name the host, give it its own
# /dev/shm, and become sshd (same pid, so killing the Popen kills the server).
_SSHD_LAUNCH = (
    'echo "$1" > /proc/sys/kernel/hostname'
    ' && mount -t tmpfs -o "size=$4,mode=1777" pdlab-shm /dev/shm'
    ' && exec "$5" -D -f "$2" -E "$3"'
)


class SSHLabError(RuntimeError):
    """The lab could not be built, or could not be taken down completely."""


@dataclasses.dataclass(frozen=True)
class LabHost:
    """One host of the lab: ``ssh root@<addr>`` reaches its sshd."""

    name: str  # its hostname, e.g. "pdhost-a"
    addr: str  # its IPv4 address, e.g. "10.250.37.11"
    netns: str  # its network namespace, e.g. "pdlab-3fa2c1-a"

    @property
    def spec(self) -> str:
        """The machine spec for ``SSHManager``: ``root@<addr>``."""
        return f"root@{self.addr}"


@dataclasses.dataclass(frozen=True)
class _LabState:
    """What teardown needs; also written to disk so a later lab can clean up after a crash."""

    lab_id: str
    subnet: str
    pid: int
    start_time: str
    tmpdir: str = ""

    @property
    def lab_ns(self) -> str:
        return f"{_PREFIX}-{self.lab_id}"

    @property
    def root_link(self) -> str:
        return f"{_PREFIX}{self.lab_id}"

    @property
    def state_file(self) -> Path:
        return _STATE_DIR / f"{self.lab_id}.json"

    def namespaces(self) -> list[str]:
        """The host namespaces that exist (whatever setup got to), then the lab namespace."""
        listed = _run(["ip", "netns", "list"], check=False).stdout.split()
        hosts = sorted(n for n in listed if n.startswith(self.lab_ns + "-"))
        return hosts + ([self.lab_ns] if self.lab_ns in listed else [])


class SSHLab:
    """``with SSHLab(n_hosts=2) as lab:`` -- n OpenSSH hosts on this machine, see the module doc."""

    def __init__(
        self,
        n_hosts: int = 2,
        *,
        connect_timeout: float = 10.0,
        start_timeout: float = 10.0,
        shm_size: str = "256m",
    ) -> None:
        if not 1 <= n_hosts <= _MAX_HOSTS:
            raise ValueError(f"n_hosts must be between 1 and {_MAX_HOSTS}, not {n_hosts}")
        self.n_hosts = n_hosts
        self.connect_timeout = connect_timeout
        self.start_timeout = start_timeout
        self.shm_size = shm_size
        self.python: str = os.path.abspath(sys.executable)
        self.hosts: list[LabHost] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self.master_addr = ""
        self.silent_addr = ""
        self.dead_addr = ""
        self.ssh_config_path = ""
        self.sshflags: tuple[str, ...] = ()
        self._state: _LabState | None = None
        self._sshd: dict[str, subprocess.Popen[bytes]] = {}  # the running one per host
        self._spawned: list[subprocess.Popen[bytes]] = []  # every one, to reap at teardown
        self._closed = False

    # ------------------------------------------------------------------ availability

    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether this machine can run a lab, and why not when it cannot."""
        if not sys.platform.startswith("linux"):
            return False, f"the SSH lab needs Linux network namespaces, not {sys.platform}"
        if os.geteuid() != 0:
            return False, "the SSH lab needs root (network namespaces, routes, sshd)"
        missing = [t for t in _TOOLS if shutil.which(t) is None]
        if not os.access(SSHD, os.X_OK):
            missing.append(SSHD)
        if missing:
            return False, (f"the SSH lab needs {', '.join(missing)}: "
                           "apt-get install -y openssh-server openssh-client iproute2")
        probe = ("ip link add pdprobe0 type veth peer name pdprobe1"
                 " && ip link add pdprobe2 type bridge")
        try:
            done = _run(["unshare", "--net", "--uts", "--mount", "sh", "-c", probe],
                        check=False, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"cannot create namespaces: {exc}"
        if done.returncode != 0:
            return False, f"cannot create namespaces, veths or bridges: {done.stderr.strip()}"
        return True, ""

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SSHLab:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Build the lab; on any failure take down what was built and raise."""
        if self._state is not None or self._closed:
            raise SSHLabError("this lab was already started; make a new SSHLab")
        ok, reason = self.available()
        if not ok:
            raise SSHLabError(reason)
        self.cleanup_stale()
        atexit.register(self.close)
        try:
            self._claim_subnet()
            self._make_keys_and_configs()
            self._make_network()
            for host in self.hosts:
                self.start_sshd(host, wait=False)
            self._wait_for_sshds(self.hosts)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Take everything down, guard route last. Idempotent; raises if something is left."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        state, self._state = self._state, None
        if state is not None:
            _teardown(state, self._spawned)

    # ------------------------------------------------------------------ using the lab

    def host(self, which: LabHost | str | int) -> LabHost:
        """A host by object, index, name (``pdhost-a``), address or namespace."""
        if isinstance(which, LabHost):
            return which
        if isinstance(which, int):
            return self.hosts[which]
        for host in self.hosts:
            if which in (host.name, host.addr, host.netns):
                return host
        raise KeyError(f"no lab host {which!r}; hosts are {[h.name for h in self.hosts]}")

    def ssh(
        self,
        host: LabHost | str | int,
        command: str,
        timeout: float = 30.0,
        *,
        input: str | None = None,
        options: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on ``host`` over ssh (not checked). Raises TimeoutExpired."""
        addr = self.host(host).addr if not _is_ip(host) else str(host)
        argv = ["ssh", *self.sshflags, *options, f"root@{addr}", command]
        return subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout,
                              stdin=subprocess.DEVNULL if input is None else None)

    def run_in(self, host: LabHost | str | int, argv: Sequence[str], timeout: float = 30.0,
               **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the host's network namespace only (root's hostname and /dev/shm)."""
        ns = self.host(host).netns
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]

    def popen_in(self, host: LabHost | str | int, argv: Sequence[str],
                 **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the host's network namespace; it is killed at teardown."""
        ns = self.host(host).netns
        argv = ["ip", "netns", "exec", ns, *argv]
        return subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]

    def processes_in(self, host: LabHost | str | int) -> list[int]:
        """Pids (not zombies) whose network namespace is the host's."""
        return _processes_in_netns(self.host(host).netns)

    @property
    def lab_id(self) -> str:
        """The random id in this lab's names: namespaces ``pdlab-<id>*``, link ``pdlab<id>``."""
        return self._require_state().lab_id

    def start_sshd(self, host: LabHost | str | int, *, wait: bool = True) -> None:
        """Start the host's sshd (a fresh /dev/shm with it); no-op while it runs."""
        host = self.host(host)
        running = self._sshd.get(host.name)
        if running is not None and running.poll() is None:
            return
        tmp = Path(self._require_state().tmpdir)
        log = tmp / host.name / "sshd.log"
        argv = ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", _SSHD_LAUNCH, "sh", host.name,
                str(tmp / host.name / "sshd_config"), str(log), self.shm_size, SSHD]
        with open(tmp / host.name / "launch.log", "ab") as out:
            self._sshd[host.name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self._spawned.append(self._sshd[host.name])
        if wait:
            self._wait_for_sshds([host])

    def kill_sshd(self, host: LabHost | str | int, timeout: float = 5.0) -> None:
        """Kill the host's sshd: new connections are refused; open sessions live on."""
        proc = self._sshd.get(self.host(host).name)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout)

    def sshd_log(self, host: LabHost | str | int) -> str:
        """The host's sshd log so far (for failure messages)."""
        tmp = Path(self._require_state().tmpdir) / self.host(host).name
        return "".join(_tail(tmp / f) for f in ("launch.log", "sshd.log"))

    # ------------------------------------------------------------------ setup steps

    def _require_state(self) -> _LabState:
        if self._state is None:
            raise SSHLabError("the lab is not running")
        return self._state

    def _claim_subnet(self) -> None:
        """Pick a free 10.250.X.0/24 and add its guard route (which is also the lock)."""
        taken = _networks_in_use()
        for _ in range(64):
            subnet = secrets.choice(_SUBNETS)
            if any(subnet.overlaps(net) for net in taken):
                continue
            state = _LabState(lab_id=secrets.token_hex(3), subnet=str(subnet),
                              pid=os.getpid(), start_time=_start_time(os.getpid()),
                              tmpdir=tempfile.mkdtemp(prefix="pydist-sshlab-"))
            added = _run(["ip", "route", "add", "unreachable", str(subnet),
                          "metric", str(GUARD_METRIC)], check=False)
            if added.returncode != 0:
                shutil.rmtree(state.tmpdir, ignore_errors=True)
                continue  # another lab took it between the look and the add
            self._state = state
            _STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            state.state_file.write_text(json.dumps(dataclasses.asdict(state)))
            self._name_addresses(state, subnet)
            return
        raise SSHLabError(f"no free /24 in {_BASE} for the lab (routes: {taken})")

    def _name_addresses(self, state: _LabState, subnet: ipaddress.IPv4Network) -> None:
        base = subnet.network_address
        self.subnet = subnet
        self.master_addr = str(base + 1)
        self.silent_addr = str(base + _SILENT)
        self.dead_addr = str(base + _DEAD)
        self.hosts = [LabHost(name=f"pdhost-{_letter(i)}", addr=str(base + _FIRST_HOST + i),
                              netns=f"{state.lab_ns}-{_letter(i)}")
                      for i in range(self.n_hosts)]

    def _make_keys_and_configs(self) -> None:
        tmp = Path(self._require_state().tmpdir)
        for key in ("ssh_host_ed25519_key", "id_ed25519"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pydist-sshlab",
                  "-f", str(tmp / key)])
        shutil.copyfile(tmp / "id_ed25519.pub", tmp / "authorized_keys")
        os.chmod(tmp / "authorized_keys", 0o600)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for host in self.hosts:
            (tmp / host.name).mkdir()
            (tmp / host.name / "sshd_config").write_text(_sshd_config(tmp, host.addr))
        self.ssh_config_path = str(tmp / "ssh_config")
        Path(self.ssh_config_path).write_text(_client_config(tmp, self.connect_timeout))
        self.sshflags = ("-F", self.ssh_config_path)

    def _make_network(self) -> None:
        state = self._require_state()
        lab, link = state.lab_ns, state.root_link
        _run(["ip", "netns", "add", lab])
        _ip_batch(lab, ["link set lo up", "link add br0 type bridge", "link set br0 up"])
        _run(["ip", "link", "add", link, "type", "veth", "peer", "name", "vroot",
              "netns", lab])
        _sysctl(f"net/ipv6/conf/{link}/disable_ipv6", "1")
        _sysctl(f"net/ipv4/conf/{link}/forwarding", "0")
        _run(["ip", "addr", "add", f"{self.master_addr}/24", "dev", link])
        _ip_batch(lab, ["link set vroot master br0", "link set vroot up"])
        _run(["ip", "link", "set", link, "up"])
        for i, host in enumerate(self.hosts):
            _run(["ip", "netns", "add", host.netns])
            _ip_batch(lab, [f"link add vh{i} type veth peer name eth0 netns {host.netns}",
                            f"link set vh{i} master br0", f"link set vh{i} up"])
            _ip_batch(host.netns, ["link set lo up", f"addr add {host.addr}/24 dev eth0",
                                   "link set eth0 up"])
        # Static neighbours only after every port is on the bridge (attaching flushes them).
        mac = "02:00:5e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        neigh = f"neigh replace {self.silent_addr} lladdr {mac} nud permanent dev"
        _run(["ip", *neigh.split(), link])
        for host in self.hosts:
            _ip_batch(host.netns, [f"{neigh} eth0"])

    def _wait_for_sshds(self, hosts: Sequence[LabHost]) -> None:
        deadline = time.monotonic() + self.start_timeout
        for host in hosts:
            while not _ssh_banner(host.addr):
                proc = self._sshd[host.name]
                if proc.poll() is not None:
                    raise SSHLabError(f"sshd on {host.name} ({host.addr}) exited with "
                                      f"{proc.returncode}:\n{self.sshd_log(host)}")
                if time.monotonic() > deadline:
                    raise SSHLabError(f"sshd on {host.name} ({host.addr}) did not accept "
                                      f"within {self.start_timeout} s:\n{self.sshd_log(host)}")
                time.sleep(0.05)

    # ------------------------------------------------------------------ crash leftovers

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Take down labs whose process is gone (killed before teardown); their ids."""
        cleaned: list[str] = []
        for path in sorted(_STATE_DIR.glob("*.json")) if _STATE_DIR.is_dir() else []:
            try:
                state = _LabState(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if _start_time(state.pid) == state.start_time:
                continue  # its owner still runs
            try:
                _teardown(state, [])
                cleaned.append(state.lab_id)
            except SSHLabError:
                pass
        return cleaned


# ---------------------------------------------------------------------- teardown


def _teardown(state: _LabState, sshds: Iterable[subprocess.Popen[bytes]],
              deadline_s: float = 15.0) -> None:
    """The ladder: processes, sockets, links and namespaces, checks, and last the guard."""
    deadline = time.monotonic() + deadline_s
    problems: list[str] = []
    namespaces = state.namespaces()
    survivors = _end_processes(namespaces, sshds, deadline)
    if survivors:
        problems.append(f"processes survived in the lab namespaces: {survivors}")
    _abort_sockets(state.subnet)
    _run(["ip", "link", "del", state.root_link], check=False)
    for ns in namespaces:
        _run(["ip", "netns", "del", ns], check=False)
    problems += _leftovers(state, deadline)
    if problems:
        raise SSHLabError(f"lab {state.lab_id}: kept the guard route for {state.subnet} "
                          f"because: {'; '.join(problems)}")
    _run(["ip", "route", "del", "unreachable", state.subnet, "metric", str(GUARD_METRIC)],
         check=False)
    state.state_file.unlink(missing_ok=True)
    if state.tmpdir:
        shutil.rmtree(state.tmpdir, ignore_errors=True)


def _end_processes(namespaces: Sequence[str], sshds: Iterable[subprocess.Popen[bytes]],
                   deadline: float) -> list[int]:
    """SIGKILL everything in the namespaces until none is left; the survivors' pids."""
    sshds = list(sshds)
    while True:
        pids = [pid for ns in namespaces for pid in _processes_in_netns(ns)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for proc in sshds:  # reap our own children: no zombie of the lab outlives it
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pids.append(proc.pid)
    return pids


def _abort_sockets(subnet: str) -> None:
    _run(["ss", "-K", "-H", "-n", "-t", "-u", "-a", "dst", subnet], check=False)


def _leftovers(state: _LabState, deadline: float) -> list[str]:
    """What still ties the root namespace to the subnet, waiting until the deadline."""
    while True:
        problems: list[str] = []
        _abort_sockets(state.subnet)
        sockets = _run(["ss", "-H", "-n", "-t", "-u", "-a", "dst", state.subnet],
                       check=False).stdout.strip()
        if sockets:
            problems.append(f"sockets to the subnet:\n{sockets}")
        if _run(["ip", "link", "show", state.root_link], check=False).returncode == 0:
            problems.append(f"link {state.root_link} still exists")
        routes = [r for r in _routes_within(state.subnet) if r.get("type") != "unreachable"]
        if routes:
            problems.append(f"routes into the subnet: {routes}")
        listed = _run(["ip", "netns", "list"], check=False).stdout.split()
        if any(n == state.lab_ns or n.startswith(state.lab_ns + "-") for n in listed):
            problems.append("namespaces still listed")
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.05)


# ---------------------------------------------------------------------- small helpers


def _run(argv: Sequence[str], *, check: bool = True,
         timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise SSHLabError(f"{' '.join(argv)} failed ({done.returncode}): "
                          f"{done.stderr.strip()}")
    return done


def _ip_batch(netns: str, commands: Sequence[str]) -> None:
    """Several ``ip`` commands in one namespace with one process."""
    done = subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise SSHLabError(f"ip -n {netns}: {commands} failed: {done.stderr.strip()}")


def _sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key
    if path.exists():  # e.g. no IPv6 at all: nothing to switch off
        path.write_text(value)


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix the root namespace routes or holds, except the default route."""
    nets: list[ipaddress.IPv4Network] = []
    for route in json.loads(_run(["ip", "-4", "-j", "route", "show", "table", "all"]).stdout):
        dst = route.get("dst", "default")
        if dst != "default":
            nets.append(ipaddress.ip_network(dst, strict=False))
    for link in json.loads(_run(["ip", "-4", "-j", "addr", "show"]).stdout):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return nets


def _routes_within(subnet: str) -> list[dict[str, object]]:
    out = _run(["ip", "-4", "-j", "route", "show", "table", "all", "root", subnet],
               check=False).stdout
    return json.loads(out) if out.strip() else []


def _processes_in_netns(netns: str) -> list[int]:
    try:
        st = os.stat(f"/run/netns/{netns}")
    except OSError:
        return []
    me = os.getpid()
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
            if (ns.st_dev, ns.st_ino) != (st.st_dev, st.st_ino):
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks ("" if it is gone): a pid plus this is unique."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _ssh_banner(addr: str) -> bool:
    try:
        with socket.create_connection((addr, SSH_PORT), timeout=1) as sock:
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


@functools.cache
def _ssh_version() -> tuple[int, int]:
    text = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr
    try:
        major, minor = text.split("_", 1)[1].split("p", 1)[0].split(".")[:2]
        return int(major), int(minor)
    except (IndexError, ValueError):
        return (0, 0)


def _sshd_config(tmp: Path, addr: str) -> str:
    lines = [
        f"ListenAddress {addr}",
        f"Port {SSH_PORT}",
        "AddressFamily inet",
        f"HostKey {tmp}/ssh_host_ed25519_key",
        f"AuthorizedKeysFile {tmp}/authorized_keys",
        "PidFile none",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "AllowTcpForwarding yes",
        "X11Forwarding no",
        "MaxSessions 64",
        "MaxStartups 64",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "LogLevel INFO",
    ]
    if _ssh_version() >= (9, 8):
        lines.append("PerSourcePenalties no")  # quick test connections must not be penalised
    return "\n".join(lines) + "\n"


def _client_config(tmp: Path, connect_timeout: float) -> str:
    return "\n".join([
        "Host *",
        "    User root",
        f"    IdentityFile {tmp}/id_ed25519",
        "    IdentitiesOnly yes",
        "    StrictHostKeyChecking no",
        "    UserKnownHostsFile /dev/null",
        "    GlobalKnownHostsFile /dev/null",
        "    CheckHostIP no",
        "    LogLevel ERROR",
        "    BatchMode yes",
        f"    ConnectTimeout {max(1, round(connect_timeout))}",
        "",
    ])


def _letter(i: int) -> str:
    return chr(ord("a") + i) if i < 26 else str(i)


def _is_ip(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""
