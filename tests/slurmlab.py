"""A real Slurm cluster on this machine, for the tests of ``SlurmManager`` and ``ElasticManager``.

The shape (``X`` random per lab, ``<id>`` six random hex digits)::

    root namespace: pytest; munged (its Unix socket is reached by path from every namespace)
      route  unreachable 10.214.X.0/24 metric 4242        the guard: added first, removed last
    namespace pdsl<id>: the "login node" and controller; no default route
      br0 10.214.X.1/24   slurmctld (hostname lab-ctl); clients and the pydist master run here
          -- va == eth0 of pdsl<id>-a  10.214.X.11   slurmd, hostname lab-a
          -- vb == eth0 of pdsl<id>-b  10.214.X.12   slurmd, hostname lab-b

Why no packet can leave the machine: the root namespace has no link into the lab at all
(every veth pair is created from inside the lab namespace, so no end ever exists in the
root namespace), and the guard route drops anything the root namespace might address to the
subnet. The lab and node namespaces have no route but their own /24.

Every daemon and client runs under ``unshare --mount`` with a small hosts file bind-mounted
over ``/etc/hosts`` (the real one is never edited); daemons also get their own hostname
(``unshare --uts``), and each node its own ``/dev/shm`` (a private tmpfs), so two nodes look
like two hosts to pydist. Nodes are entered with ``nsenter --net`` (not ``ip netns exec``,
which remounts ``/sys`` and hides the cgroup tree slurmd needs). ``SLURM_CONF`` is always
exported, so no client ever looks for a configuration server.

Teardown: cancel every job, SIGTERM the daemons by their saved processes (slurmds, then
slurmctld, then munged; SIGKILL as a fallback), SIGKILL anything left in the lab's
namespaces, delete the namespaces, check that nothing is left, and last remove the guard.
A lab whose process was killed before its teardown is taken down by the next lab
(``SlurmLab.cleanup_stale``, from the state file each lab keeps in ``/run/pydist-slurmlab``).

This module imports nothing from pytest::

    with SlurmLab() as lab:
        print(lab.client(["srun", "-N2", "hostname"]).stdout)
"""
from __future__ import annotations

import atexit
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
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SlurmLab", "SlurmLabError"]

GUARD_METRIC = 4242
_BASE = ipaddress.ip_network("10.214.0.0/16")
_SUBNETS = list(_BASE.subnets(new_prefix=24))[1:-1]
_PREFIX = "pdsl"
_TOOLS = ("ip", "nsenter", "unshare", "mount", "munged", "mungekey", "slurmctld", "slurmd",
          "srun", "sinfo", "squeue", "scancel", "salloc", "sbatch")
_HOME = str(Path(__file__).resolve().parent.parent)
_STATE_DIR = Path("/run/pydist-slurmlab")   # one file per running lab, for cleanup_stale

# Runs under `unshare --uts --mount`: the daemon's hostname, the lab's hosts file, a private
# /dev/shm on nodes; then the daemon itself (same pid, so its Popen is the daemon).
_DAEMON = ('hostname "$1" && mount --bind "$2" /etc/hosts'
           ' && { [ "$3" = shm ] || mount -t tmpfs -o size=256m,mode=1777 pdsl-shm /dev/shm; }'
           ' && shift 3 && exec "$@"')
_CLIENT = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'


class SlurmLabError(RuntimeError):
    """The lab could not be built, or could not be taken down completely."""


class SlurmLab:
    """``with SlurmLab() as lab:`` -- munged, slurmctld and ``n_nodes`` slurmds (see the module doc)."""

    def __init__(self, n_nodes: int = 2, cpus: int = 2, start_timeout: float = 30.0) -> None:
        if not 1 <= n_nodes <= 20:
            raise ValueError(f"n_nodes must be between 1 and 20, not {n_nodes}")
        self.n_nodes, self.cpus, self.start_timeout = n_nodes, cpus, start_timeout
        self.lab_id = secrets.token_hex(3)
        self.lab_ns = f"{_PREFIX}{self.lab_id}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.ctl_addr = ""
        self.nodes: list[tuple[str, str, str]] = []   # (hostname, address, namespace)
        self.tmp = ""
        self.conf = ""
        self.hosts_file = ""
        self.python = os.path.abspath(sys.executable)
        self.bringup_seconds = 0.0
        self._daemons: dict[str, subprocess.Popen] = {}
        self._guard = False
        self._closed = False

    # -- availability ----------------------------------------------------------------
    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether this machine can run a lab, and why not when it cannot."""
        if not sys.platform.startswith("linux"):
            return False, f"the Slurm lab needs Linux network namespaces, not {sys.platform}"
        if os.geteuid() != 0:
            return False, "the Slurm lab needs root (network namespaces, routes, daemons)"
        missing = [t for t in _TOOLS if shutil.which(t) is None]
        if missing:
            return False, (f"the Slurm lab needs {', '.join(missing)}: "
                           "apt-get install -y slurm-wlm munge iproute2")
        if not os.path.isdir("/run/netns") and not os.access("/run", os.W_OK):
            return False, "the Slurm lab needs a writable /run/netns"
        return True, ""

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> SlurmLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        ok, reason = self.available()
        if not ok:
            raise SlurmLabError(reason)
        self.cleanup_stale()
        atexit.register(self.close)
        t0 = time.monotonic()
        try:
            self._claim_subnet()
            self._write_files()
            self._save_state()
            self._make_network()
            self._start_munged()
            self._start_slurmctld()
            for name, _, ns in self.nodes:
                self._start_daemon(f"slurmd-{name}", ns, name, "shm-private",
                                   ["slurmd", "-D", "-f", self.conf])
            self._save_state()
            self._wait_idle()
        except BaseException:
            self.close()
            raise
        self.bringup_seconds = time.monotonic() - t0

    def close(self) -> None:
        """Take everything down, guard route last. Idempotent; raises if something is left."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        problems: list[str] = []
        if "slurmctld" in self._daemons:
            self.client(["scancel", "--user=root"], timeout=10, check=False)
        for key in [k for k in self._daemons if k.startswith("slurmd-")] + ["slurmctld", "munged"]:
            proc = self._daemons.get(key)
            if proc is not None and not _stop(proc, 8.0):
                problems.append(f"{key} (pid {proc.pid}) did not stop")
        namespaces = [ns for _, _, ns in self.nodes] + [self.lab_ns]
        deadline = time.monotonic() + 10
        while True:
            left = [p for ns in namespaces for p in _processes_in_netns(ns)]
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if left:
            problems.append(f"processes survived in the lab: {left}")
        for ns in namespaces:
            _run(["ip", "netns", "del", ns], check=False)
        listed = _run(["ip", "netns", "list"], check=False).stdout.split()
        if any(n.startswith(self.lab_ns) for n in listed):
            problems.append("namespaces still listed")
        if problems:
            raise SlurmLabError(f"Slurm lab {self.lab_id}: kept the guard route for "
                                f"{self.subnet} because: {'; '.join(problems)}")
        if self._guard:
            _run(["ip", "route", "del", "unreachable", str(self.subnet), "metric",
                  str(GUARD_METRIC)], check=False)
            self._guard = False
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        (_STATE_DIR / f"{self.lab_id}.json").unlink(missing_ok=True)

    # -- crash leftovers -------------------------------------------------------------
    def _save_state(self) -> None:
        _STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = {"pid": os.getpid(), "start": _start_time(os.getpid()), "subnet": str(self.subnet),
                 "namespaces": [ns for _, _, ns in self.nodes] + [self.lab_ns], "tmp": self.tmp,
                 "daemons": [p.pid for p in self._daemons.values()]}
        (_STATE_DIR / f"{self.lab_id}.json").write_text(json.dumps(state))

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Take down labs whose process is gone (killed before teardown); their ids."""
        cleaned = []
        for path in sorted(_STATE_DIR.glob("*.json")) if _STATE_DIR.is_dir() else []:
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if _start_time(state["pid"]) == state["start"]:
                continue   # its owner still runs
            for pid in state["daemons"]:   # only if the pid is still one of the lab's daemons
                if any(d in _cmdline(pid) for d in ("munged", "slurmctld", "slurmd")):
                    _kill(pid)
            for ns in state["namespaces"]:
                for pid in _processes_in_netns(ns):
                    _kill(pid)
                _run(["ip", "netns", "del", ns], check=False)
            _run(["ip", "route", "del", "unreachable", state["subnet"], "metric",
                  str(GUARD_METRIC)], check=False)
            shutil.rmtree(state["tmp"], ignore_errors=True)
            path.unlink(missing_ok=True)
            cleaned.append(path.stem)
        return cleaned

    # -- using the lab ---------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment of a client (and of a pydist master) inside the lab."""
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([_HOME, *paths])
        for var in [v for v in env if v.startswith(("SLURM_", "SALLOC_", "SBATCH_", "SRUN_"))]:
            if var != "SLURM_CONF":
                del env[var]
        return env

    def client_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on the lab's login node: its network and hosts file."""
        return ["nsenter", f"--net=/run/netns/{self.lab_ns}", "unshare", "--mount",
                "--propagation", "private", "sh", "-c", _CLIENT, "sh", self.hosts_file, *argv]

    def client(self, argv: Sequence[str], timeout: float = 60.0, check: bool = True,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (or anything) on the login node and wait for it."""
        done = subprocess.run(self.client_argv(argv), env=self.env, capture_output=True,
                              cwd=self.tmp,   # a job's stray output files land there
                              text=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise SlurmLabError(f"{' '.join(argv)} failed ({done.returncode}): "
                                f"{done.stdout}{done.stderr}")
        return done

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """Start ``argv`` on the login node (the caller waits for it)."""
        kwargs.setdefault("cwd", self.tmp)
        return subprocess.Popen(self.client_argv(argv), env=self.env,  # type: ignore[call-overload]
                                **kwargs)

    def node_argv(self, node: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run in node ``node``'s network namespace, by a plain command (no Slurm)."""
        return ["nsenter", f"--net=/run/netns/{self.nodes[node][2]}", *argv]

    def jobs(self) -> list[str]:
        """``squeue`` lines (job id, state, nodes) of every job the controller knows."""
        out = self.client(["squeue", "-h", "-o", "%i %T %N"], timeout=20).stdout
        return [line for line in out.splitlines() if line.strip()]

    def cancel_all(self, timeout: float = 20.0) -> None:
        """Cancel every job and wait until ``squeue`` is empty."""
        self.client(["scancel", "--user=root"], timeout=20, check=False)
        deadline = time.monotonic() + timeout
        while self.jobs():
            if time.monotonic() > deadline:
                raise SlurmLabError(f"jobs left after scancel: {self.jobs()}")
            time.sleep(0.1)

    def log(self, name: str) -> str:
        """A daemon's log so far (``slurmctld``, ``slurmd-lab-a``, ``munged``)."""
        try:
            return (Path(self.tmp) / f"{name}.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- setup steps -----------------------------------------------------------------
    def _claim_subnet(self) -> None:
        """Pick a free 10.214.X.0/24 and add its guard route (which is also the lock)."""
        for _ in range(64):
            subnet = secrets.choice(_SUBNETS)
            added = _run(["ip", "route", "add", "unreachable", str(subnet), "metric",
                          str(GUARD_METRIC)], check=False)
            if added.returncode == 0:
                self.subnet, self._guard = subnet, True
                base = subnet.network_address
                self.ctl_addr = str(base + 1)
                self.nodes = [(f"lab-{chr(97 + i)}", str(base + 11 + i),
                               f"{self.lab_ns}-{chr(97 + i)}") for i in range(self.n_nodes)]
                return
        raise SlurmLabError(f"no free /24 in {_BASE} for the lab")

    def _write_files(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"pydist-slurmlab-{self.lab_id}-")
        tmp = Path(self.tmp)
        os.chmod(tmp, 0o755)
        (tmp / "munge").mkdir(mode=0o755)
        (tmp / "key").mkdir(mode=0o700)
        for name, _, _ in self.nodes:
            (tmp / "spool" / name).mkdir(parents=True)
        (tmp / "state").mkdir()
        me = socket.gethostname()
        hosts = ["127.0.0.1 localhost", f"{self.ctl_addr} lab-ctl {me}"]
        hosts += [f"{addr} {name}" for name, addr, _ in self.nodes]
        self.hosts_file = str(tmp / "hosts")
        Path(self.hosts_file).write_text("\n".join(hosts) + "\n")
        self.conf = str(tmp / "slurm.conf")
        Path(self.conf).write_text(_slurm_conf(tmp, self.ctl_addr, self.nodes, self.cpus))

    def _make_network(self) -> None:
        lab = self.lab_ns
        _run(["ip", "netns", "add", lab])
        _ip_batch(lab, ["link set lo up", "link add br0 type bridge",
                        f"addr add {self.ctl_addr}/24 dev br0", "link set br0 up"])
        for i, (_, addr, ns) in enumerate(self.nodes):
            _run(["ip", "netns", "add", ns])
            _ip_batch(lab, [f"link add v{i} type veth peer name eth0 netns {ns}",
                            f"link set v{i} master br0", f"link set v{i} up"])
            _ip_batch(ns, ["link set lo up", f"addr add {addr}/24 dev eth0", "link set eth0 up"])

    def _start_munged(self) -> None:
        tmp = Path(self.tmp)
        key = tmp / "key" / "munge.key"
        _run(["mungekey", "--create", f"--keyfile={key}"])
        os.chmod(key, 0o400)
        argv = ["munged", "-F", "--force", f"--socket={tmp}/munge/munge.socket",
                f"--key-file={key}", f"--log-file={tmp}/munged.log",
                f"--pid-file={tmp}/munge/munged.pid", f"--seed-file={tmp}/munge/seed"]
        self._daemons["munged"] = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL,
                                                   start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while not (tmp / "munge" / "munge.socket").exists():
            if self._daemons["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmLabError(f"munged did not start:\n{self.log('munged')}")
            time.sleep(0.01)

    def _start_slurmctld(self) -> None:
        self._start_daemon("slurmctld", self.lab_ns, "lab-ctl", "shm",
                           ["slurmctld", "-D", "-c", "-f", self.conf])

    def _start_daemon(self, key: str, ns: str, hostname: str, shm: str, argv: list[str]) -> None:
        cmd = ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount",
               "--propagation", "private", "sh", "-c", _DAEMON, "sh", hostname,
               self.hosts_file, shm, *argv]
        with open(Path(self.tmp) / f"{key}.out", "ab") as out:
            self._daemons[key] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL,
                                                  stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True)

    def _wait_idle(self) -> None:
        """Poll until every node is idle (never a fixed sleep)."""
        deadline = time.monotonic() + self.start_timeout
        want = {name for name, _, _ in self.nodes}
        while True:
            for key, proc in self._daemons.items():
                if proc.poll() is not None:
                    raise SlurmLabError(f"{key} exited with {proc.returncode}:\n"
                                        f"{self.log(key)}{_tail(Path(self.tmp) / (key + '.out'))}")
            done = self.client(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], timeout=20,
                               check=False)
            if want <= set(done.stdout.split()):
                return
            if time.monotonic() > deadline:
                raise SlurmLabError(f"nodes not idle within {self.start_timeout} s: "
                                    f"{done.stdout}{done.stderr}\n{self.log('slurmctld')}")
            time.sleep(0.05)


def _slurm_conf(tmp: Path, ctl_addr: str, nodes: list[tuple[str, str, str]], cpus: int) -> str:
    lines = [
        "ClusterName=pydistlab",
        f"SlurmctldHost=lab-ctl({ctl_addr})",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={tmp}/munge/munge.socket",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={tmp}/state", f"SlurmdSpoolDir={tmp}/spool/%n",
        f"SlurmctldPidFile={tmp}/slurmctld.pid", f"SlurmdPidFile={tmp}/spool/%n.pid",
        f"SlurmctldLogFile={tmp}/slurmctld.log", f"SlurmdLogFile={tmp}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "ReturnToService=2", "KillWait=5", "SlurmctldPort=6817", "SlurmdPort=6818",
        "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
    ]
    for name, addr, _ in nodes:
        lines.append(f"NodeName={name} NodeAddr={addr} NodeHostname={name} CPUs={cpus} "
                     f"Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1000")
    lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _stop(proc: subprocess.Popen, grace: float) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` s; whether it is gone and reaped."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return True
        try:
            proc.send_signal(sig)
        except OSError:
            pass
        try:
            proc.wait(wait)
            return True
        except subprocess.TimeoutExpired:
            continue
    return proc.poll() is not None


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise SlurmLabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _ip_batch(ns: str, commands: Sequence[str]) -> None:
    done = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise SlurmLabError(f"ip -n {ns}: {commands} failed: {done.stderr.strip()}")


def _processes_in_netns(ns: str) -> list[int]:
    """Live pids (not zombies) whose network namespace is ``ns``."""
    try:
        st = os.stat(f"/run/netns/{ns}")
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            s = os.stat(f"/proc/{entry}/ns/net")
            if (s.st_dev, s.st_ino) != (st.st_dev, st.st_ino):
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks ("" if it is gone): a pid plus this is unique."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


if __name__ == "__main__":   # bring a lab up, run one job, take it down: a quick check
    with SlurmLab() as lab:
        print(f"bring-up {lab.bringup_seconds:.2f} s")
        t = time.monotonic()
        print(lab.client(["srun", "-N2", "-n2", "hostname"]).stdout.strip())
        print(f"srun -N2 hostname {time.monotonic() - t:.3f} s")
    print(json.dumps({"namespaces": _run(["ip", "netns", "list"]).stdout.split()}))
