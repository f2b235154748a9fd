"""A master that plants a known cookie, walks every error path it can reach and prints
every text it produced; the test reading its output greps it for the cookie.

Run as ``python cookie_master.py <transport>`` with the cookie on standard input (never
in argv, which the workers' checks read); prints ``DONE`` at the end.
"""
from __future__ import annotations

import os
import sys
import time

import pydist as pd
from pydist import transport as _transport
from pydist.cluster.group import PGRP
from pydist.cluster.join import authenticate


def show(label: str, text: object) -> None:
    print(f"--- {label}:\n{text}", flush=True)


def expect_error(label: str, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as e:   # noqa: BLE001 -- every kind of failure is printed
        show(label, f"{type(e).__name__}: {e}\n{e!r}")
    else:
        show(label, "no error")


def boom(x):
    raise ValueError(f"remote failure {x}")


def main(transport: str, cookie: str) -> None:
    pd.cluster_cookie(cookie)
    # A "worker" that prints the first line of its standard input (the cookie) and stops.
    echo = ["-c", "head -n1; echo oops >&2; exit 3", "sh"]
    t0 = time.monotonic()
    expect_error("echoing launcher", pd.addprocs, 1, exename="/bin/sh", exeflags=echo,
                 transport=transport)
    show("echoing launcher took", f"{time.monotonic() - t0:.1f} s")
    expect_error("bad interpreter flag", pd.addprocs, 1, exeflags="-X frozen_modules=bogus",
                 transport=transport)
    expect_error("stdin as a program", pd.addprocs, 1, exeflags="-", transport=transport)
    pids = pd.addprocs(2, transport=transport)
    a, b = pids
    expect_error("remote exception", pd.remotecall_fetch, boom, a, 1)
    expect_error("remote exception via a Future", pd.fetch, pd.remotecall(boom, b, 2))
    f = pd.remotecall(time.sleep, a, 0)
    rc = pd.RemoteChannel(pid=b)
    show("reprs", [f, rc, PGRP.workers[a], PGRP.workers[a].config, PGRP.workers[a].manager, PGRP])
    url = next(u for u in PGRP.workers[a].addresses if u.startswith("tcp://"))
    t = _transport.connect(url, 5)
    expect_error("a hello with the wrong cookie", authenticate, t, "not-the-cookie", "dial", 5)
    t.abort()
    pd.remote_do(boom, a, 3)   # its error is printed by the worker and relayed here
    pd.rmprocs(b)
    expect_error("a call to a removed worker", pd.remotecall_fetch, os.getpid, b)
    ospid = pd.remotecall_fetch(os.getpid, a)
    secret = cookie.encode()
    for what in ("cmdline", "environ"):
        with open(f"/proc/{ospid}/{what}", "rb") as fh:
            assert secret not in fh.read(), what
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as fh:
        assert secret not in fh.read()
    for fd in os.listdir(f"/proc/{ospid}/fd"):
        path = os.path.realpath(f"/proc/{ospid}/fd/{fd}")
        if os.path.isfile(path) and os.stat(path).st_mode & 0o077:
            with open(path, "rb") as fh:
                assert secret not in fh.read(), path
    for name in os.listdir("/dev/shm"):
        try:
            with open(f"/dev/shm/{name}", "rb") as fh:
                assert secret not in fh.read(), name
        except PermissionError:
            pass
    time.sleep(0.5)   # let the relayed worker output arrive
    pd.rmprocs(a)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.stdin.readline().strip())
