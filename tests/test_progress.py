"""Progress bars: the drop-ins' ``progress=True``, ``pydist.progress(futures)``, and the
error when tqdm is missing."""
from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import time

import pytest

import pydist as pd


def square(x: int) -> int:
    return x * x


def nap_square(x: int) -> int:
    time.sleep(0.01)
    return x * x


def test_pool_map_and_imaps_show_a_bar(transport, leak_oracle, capsys):
    with pd.Pool(2, transport=transport) as pool:
        assert pool.map(square, range(50), progress=True) == [x * x for x in range(50)]
        assert list(pool.imap(square, range(30), progress=True)) == [x * x for x in range(30)]
        assert sorted(pool.imap_unordered(square, range(20), 3, progress=True)) == \
            [x * x for x in range(20)]
        assert pool.map(square, range(5)) == [x * x for x in range(5)]   # off by default
    err = capsys.readouterr().err
    assert "Pool.map" in err and "50/50" in err
    assert "Pool.imap" in err and "30/30" in err
    assert "Pool.imap_unordered" in err and "20/20" in err
    assert err.count("Pool.map") == err.count("Pool.map:")   # no bar for the last map


def test_executor_map_shows_a_bar(transport, leak_oracle, capsys):
    with pd.ProcessPoolExecutor(2, transport=transport) as ex:
        assert list(ex.map(square, range(40), progress=True)) == [x * x for x in range(40)]
        assert list(ex.map(square, range(8), chunksize=3, progress=True)) == \
            [x * x for x in range(8)]
    err = capsys.readouterr().err
    assert "40/40" in err and "8/8" in err


def test_progress_of_futures_of_both_kinds(cluster, capsys):
    remote = [pd.remotecall(nap_square, cluster[i % 2], i) for i in range(6)]
    with cf.ThreadPoolExecutor(2) as ex:
        local = [ex.submit(nap_square, i) for i in range(4)]
        out = pd.progress(remote + local, desc="jobs", timeout=60)
    assert out == remote + local
    assert all(f.isready() for f in remote) and all(f.done() for f in local)
    assert [f.fetch() for f in remote] == [i * i for i in range(6)]
    err = capsys.readouterr().err
    assert "jobs" in err and "10/10" in err


def test_progress_times_out_on_a_future_never_filled(capsys):
    with pytest.raises(TimeoutError, match="1 futures still pending"):
        pd.progress([pd.Future()], timeout=0.2)


def test_bad_progress_arguments_are_named():
    with pytest.raises(TypeError, match="pmap: progress must be True or False"):
        pd.pmap(square, range(3), progress="yes")
    with pytest.raises(TypeError, match="expected futures, got int"):
        pd.progress([1, 2])


def test_progress_without_tqdm_says_what_to_install():
    # A fresh interpreter in which ``import tqdm`` fails, as where it is not installed.
    code = ("import sys; sys.modules['tqdm'] = None\n"
            "import pydist as pd\n"
            "assert pd.pmap(abs, [-1, -2]) == [1, 2]\n"
            "try:\n"
            "    pd.pmap(abs, [-1, -2], progress=True)\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pmap: progress=True needs tqdm" in out.stdout
    assert "pip install 'pydist[progress]'" in out.stdout
