"""What the first calls cost: ``import pydist`` loads nothing until used, and a remotecall's
owner announces a small result with the value, so ``fetch`` needs no second round trip."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from testkit import subprocess_env, wait_until

import pydist as pd
from pydist.cluster.values import PUSH_LIMIT

STEP = 30.0


def test_import_pydist_loads_only_the_package():
    code = ("import sys, pydist; print(sorted(m for m in sys.modules if m.startswith('pydist')));"
            "pydist.remotecall; import pydist.pools.pmap, pydist.refs.remotecall;"
            "print(callable(pydist.pmap), callable(pydist.remotecall))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=STEP)
    assert out.returncode == 0, out.stderr
    loaded, names = out.stdout.splitlines()
    assert loaded == "['pydist']"
    assert names == "True True"       # a submodule named like its function does not hide it


def _small() -> tuple:
    return (1, 2.5, "three")


def _large() -> bytes:
    return b"x" * (PUSH_LIMIT + 1)


def test_a_small_result_comes_with_its_announcement(fresh):
    (w,) = fresh(1)
    small, large = pd.remotecall(_small, w), pd.remotecall(_large, w)
    assert wait_until(lambda: small.isready() and large.isready(), STEP)
    os.kill(pd.remotecall_fetch(os.getpid, w), signal.SIGKILL)
    assert wait_until(lambda: w not in pd.workers(), STEP)
    assert small.fetch(timeout=STEP) == (1, 2.5, "three")   # it was here already
    with pytest.raises(pd.ProcessExitedException):
        large.fetch(timeout=STEP)                           # it stayed with its owner


def test_a_failure_is_announced_too(fresh):
    (w,) = fresh(1)
    f = pd.remotecall(lambda: 1 / 0, w)
    assert wait_until(f.isready, STEP)
    with pytest.raises(pd.RemoteException) as info:
        f.wait(timeout=STEP)
    assert isinstance(info.value.captured.ex, ZeroDivisionError)
    with pytest.raises(pd.RemoteException):
        f.fetch(timeout=STEP)


def _main_global(spec, path, argv, compiled):
    import sys

    from pydist.dropin.mainscript import _load_main
    _load_main(spec, path, argv, compiled)
    return sys.modules["__main__"].WHICH


def test_a_worker_runs_the_main_script_as_the_master_compiled_it(fresh, tmp_path):
    from pydist.dropin.mainscript import main_code
    script = tmp_path / "prog.py"
    script.write_text("WHICH = 'compiled by the master'\n")
    spec = ("path", str(script))
    magic, code = main_code(spec)
    script.write_text("WHICH = 'read by the worker'\n")   # what a worker would read itself
    a, b = fresh(2)
    assert pd.remotecall_fetch(_main_global, a, spec, [], [], (magic, code)) == \
        "compiled by the master"
    # A worker of another Python (another bytecode magic number) compiles the file itself.
    assert pd.remotecall_fetch(_main_global, b, spec, [], [], (b"????", code)) == \
        "read by the worker"


def test_every_public_name_loads_on_first_use():
    code = ("import pydist, pydist.managers as m;"
            "[getattr(pydist, n) for n in pydist.__all__]; [getattr(m, n) for n in m.__all__];"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=STEP)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
