"""Workers on other machines over SSH, beside local ones, in one cluster.

    python examples/ssh_cluster.py user@host1 user@host2:2222 [--per-host 2]
                                   [--sshflags="-i ~/.ssh/id_ed25519"] [--python python3]

Each host needs an SSH server you can log in to without a password prompt, and Python with
pydist installed (``--python`` names the interpreter there). The master starts
``--per-host`` workers on every host, one local worker, and runs a ``pmap`` over all of
them; the hostnames in the output show where each element ran. See docs/ssh.md.
"""
# example-test: needs the SSH lab (tests/sshlab.py); run by tests/test_examples.py with its hosts
from __future__ import annotations

import argparse
import shlex
import socket
from collections import Counter

import pydist as pd


def where(x: int) -> tuple[int, str]:
    """Run anywhere: the element and the host it ran on."""
    return x, socket.gethostname()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", nargs="+", help="machine specs: [user@]host[:port]")
    parser.add_argument("--per-host", type=int, default=2)
    parser.add_argument("--sshflags", default="", help="extra ssh options, as one string")
    parser.add_argument("--python", default="python3", help="the interpreter on the hosts")
    args = parser.parse_args()

    remote = pd.addprocs([(h, args.per_host) for h in args.hosts],
                         sshflags=tuple(shlex.split(args.sshflags)), exename=args.python)
    local = pd.addprocs(1)
    try:
        print("workers:", {p: pd.remotecall_fetch(socket.gethostname, p) for p in pd.workers()})
        ran_on = Counter(host for _, host in pd.pmap(where, range(200)))
        print("elements per host:", dict(ran_on))
    finally:
        pd.rmprocs(*remote, *local, waitfor=30)


if __name__ == "__main__":
    main()
