"""Programs written for the standard library behave the same with pydist's drop-ins: each
script here runs in a fresh interpreter once with ``concurrent.futures``/``multiprocessing``
(spawn, as pydist's workers are fresh interpreters) and once with pydist on each transport,
and the two must print the same and exit the same. Beside them, the same behaviours through
the Julia API: worker output, the ``__main__`` namespace and remote tracebacks."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 90

# Both heads have the same number of lines, so line numbers in tracebacks agree.
STDLIB_HEAD = """\
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import Pool
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
"""
PYDIST_HEAD = """\
import functools
import pydist
ProcessPoolExecutor = functools.partial(pydist.ProcessPoolExecutor, transport={transport!r})
Pool = functools.partial(pydist.Pool, transport={transport!r})
pydist.ProcessPoolExecutor  # (the head is as long as the standard library's)
"""


def _env() -> dict[str, str]:
    """The environment of the programs: unbuffered, as at a terminal, so that the standard
    library's workers write what they print at once (else only when they exit)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def run(path: str, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=_env(), cwd=cwd)


def both(tmp_path, transport: str, body: str) -> tuple[subprocess.CompletedProcess, ...]:
    """Run ``body`` with the standard library's pools and with pydist's."""
    body = textwrap.dedent(body)
    out = []
    for name, head in (("std", STDLIB_HEAD), ("pd", PYDIST_HEAD.format(transport=transport))):
        path = tmp_path / name / "prog.py"
        path.parent.mkdir()
        path.write_text(head + body)
        out.append(run(str(path), cwd=str(tmp_path)))
    return tuple(out)


def same(std: subprocess.CompletedProcess, pd: subprocess.CompletedProcess) -> None:
    assert (pd.returncode, pd.stdout, pd.stderr) == (std.returncode, std.stdout, std.stderr), \
        f"standard library:\n{std.stdout}\n{std.stderr}\npydist:\n{pd.stdout}\n{pd.stderr}"


# -- worker output ---------------------------------------------------------------------------------
def test_task_output_reaches_stdout_and_stderr_before_the_result(tmp_path, transport):
    std, pd = both(tmp_path, transport, """
        import sys

        def task(x):
            print(f"out {x}")
            print(f"err {x}", file=sys.stderr)
            sys.stdout.write("no newline ")
            return x * 2

        def ready():
            print("worker ready")
            print("ready, on stderr", file=sys.stderr)

        if __name__ == "__main__":
            with ProcessPoolExecutor(1, initializer=ready) as ex:
                print("result", ex.submit(task, 9).result(), flush=True)
            with Pool(1, initializer=ready) as p:
                print("result", p.apply(task, (8,)), flush=True)
            with ProcessPoolExecutor(1) as ex:     # one worker: the tasks' output has an order
                for i in range(3):
                    print("result", ex.submit(task, i).result(), flush=True)
                print(list(ex.map(task, range(3))), flush=True)
            with Pool(2) as p:
                print("result", p.apply(task, (7,)), flush=True)
                print(p.map(task, range(4), chunksize=4), flush=True)
    """)
    assert std.returncode == 0, std.stderr
    same(std, pd)


def test_julia_api_output_is_prefixed_and_stderr_stays_stderr(tmp_path, transport):
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(f"""
        import sys
        import time
        import pydist

        def talk():
            print("hello")
            print("oops", file=sys.stderr)
            return 1

        got = []
        [a] = pydist.addprocs(1, transport={transport!r})
        [b] = pydist.addprocs(1, transport={transport!r}, output="raw")
        [c] = pydist.addprocs(1, transport={transport!r},
                              output=lambda pid, stream, data: got.append((pid, stream, data)))
        for p in (a, b, c):
            pydist.remotecall_fetch(talk, p)
        pydist.rmprocs(a, b, c, waitfor=30)
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        print("callable", sorted(got) == [(c, "stderr", b"oops\\n"), (c, "stdout", b"hello\\n")])
    """))
    done = run(str(path), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["      From worker 2:\thello", "callable True", "hello"], \
        done.stdout
    assert sorted(done.stderr.splitlines()) == ["      From worker 2:\toops", "oops"], done.stderr


def test_everyday_programs_print_the_same(tmp_path, transport):
    """Programs in the style of the two modules' documentation, printing from the master and
    the workers, with a failing task at the end."""
    std, pd = both(tmp_path, transport, """
        import concurrent.futures
        import math
        import sys

        NUMBERS = [112272535095293, 112582705942171, 115280095190773, 1099726899285419]

        def is_prime(n):
            if n < 2 or n % 2 == 0:
                return n == 2
            return all(n % k for k in range(3, int(math.isqrt(n)) + 1, 2))

        def square(x):
            return x * x

        def shout(x):
            print("squaring", x)     # one task at a time: the order is known
            return x * x

        def check(x):
            if x == 3:
                raise ValueError("three is right out")
            return x

        if __name__ == "__main__":
            with ProcessPoolExecutor() as executor:
                for number, prime in zip(NUMBERS, executor.map(is_prime, NUMBERS)):
                    print(f"{number} is prime: {prime}")
                futures = {executor.submit(square, x): x for x in range(3)}
                done = [(futures[f], f.result()) for f in concurrent.futures.as_completed(futures)]
                print(sorted(done), file=sys.stderr)
            with Pool(3) as p:
                print(p.map(square, [1, 2, 3]))
                print(sorted(p.imap_unordered(square, range(4))))
                print(p.apply_async(shout, (10,)).get(timeout=30))
                print(p.map(check, range(5)))
    """)
    assert std.returncode == 1 and "ValueError: three is right out" in std.stderr, std.stderr
    std_err = std.stderr.splitlines()
    pd_err = pd.stderr.splitlines()
    # The worker's part of the last traceback differs (pydist leaves out the frames of its
    # worker loop); everything else is the same, in the same order.
    cut = [line for line in std_err if not line.startswith(("  File", "    "))]
    assert [line for line in pd_err if not line.startswith(("  File", "    "))] == cut
    assert (pd.returncode, pd.stdout) == (std.returncode, std.stdout)


# -- the main script's globals ---------------------------------------------------------------------
def test_globals_of_the_main_script_are_one_namespace_per_worker(tmp_path, transport):
    std, pd = both(tmp_path, transport, """
        import sys
        print("at import:", __name__)
        state = None

        class Point:
            def __init__(self, x):
                self.x = x

        def init(v):
            global state
            state = v

        def task(x):
            global state
            state = state + x
            return state

        def check(p):
            return isinstance(p, Point), type(p).__module__, Point(p.x + 1)

        if __name__ == "__main__":
            with ProcessPoolExecutor(1, initializer=init, initargs=(10,)) as ex:
                print([ex.submit(task, i).result() for i in range(4)])
                ok, module, q = ex.submit(check, Point(1)).result()
                print(ok, module, q.x, isinstance(q, Point))
            with Pool(1, initializer=init, initargs=(100,)) as p:
                print(p.map(task, range(4)))
    """)
    assert std.returncode == 0, std.stderr
    same(std, pd)


def test_globals_are_one_namespace_without_a_script(tmp_path, transport):
    """``-c`` (as a notebook or a session): functions travel by value, into __main__."""
    code = textwrap.dedent(f"""
        import pydist
        state = None
        a = 1

        def init(v):
            global state
            state = v

        def task(x):
            global state
            state = state + x
            return state

        if __name__ == "__main__":
            with pydist.ProcessPoolExecutor(1, initializer=init, initargs=(10,),
                                            transport={transport!r}) as ex:
                print([ex.submit(task, i).result() for i in range(3)])
                print(list(ex.map(lambda x: state + x, range(2))))
            [p] = pydist.addprocs(1, transport={transport!r})
            pydist.remotecall_fetch(init, p, 5)
            print(pydist.remotecall_fetch(lambda: (state, a), p))
            a = 2
            print(pydist.remotecall_fetch(lambda: (state, a), p))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT, env=_env(), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[10, 11, 13]\n[13, 14]\n(5, 1)\n(5, 2)\n"


# -- tracebacks ------------------------------------------------------------------------------------
def _remote_part(stderr: str) -> str:
    """The remote traceback between the triple quotes."""
    match = re.search(r'"""\n(.*?)"""', stderr, re.S)
    assert match, stderr
    return match.group(1)


def test_remote_tracebacks_show_the_script_and_no_pydist_frames(tmp_path, transport):
    std, pd = both(tmp_path, transport, """
        def inner(x):
            raise ValueError(f"bad {x}")

        def task(x):
            return inner(x) + 1

        if __name__ == "__main__":
            with ProcessPoolExecutor(1) as ex:
                ex.submit(task, 3).result()
    """)
    assert std.returncode == pd.returncode == 1
    user_lines = ['line 11, in task\n    return inner(x) + 1', 'line 8, in inner\n    raise ValueError(f"bad {x}")']
    for done in (std, pd):
        remote = _remote_part(done.stderr)
        for line in user_lines:
            assert line in remote, remote
    assert "pydist" not in _remote_part(pd.stderr), pd.stderr


def test_remote_tracebacks_of_code_sent_by_value_show_its_lines(tmp_path, transport):
    """A notebook cell's function (its lines only in ``linecache``) and code run by
    ``everywhere``: the worker's traceback names the cell's file and shows the lines."""
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(f"""
        import linecache
        import pydist

        [p] = pydist.addprocs(1, transport={transport!r})
        cell = "/nonexistent/ipykernel_1/cell7.py"
        src = "def cell_fn(x):\\n    y = x * 2\\n    raise KeyError(y)\\n"
        linecache.cache[cell] = (len(src), None, src.splitlines(True), cell)
        exec(compile(src, cell, "exec"), globals())
        try:
            pydist.remotecall_fetch(cell_fn, p, 4)
        except Exception as e:
            print(e)
        pydist.everywhere("def ev(x):\\n    return 1 / x\\n")
        try:
            pydist.remotecall_fetch(lambda: ev(0), p)
        except Exception as e:
            print(e)
    """))
    done = run(str(path), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert 'File "/nonexistent/ipykernel_1/cell7.py", line 3, in cell_fn\n    raise KeyError(y)' in done.stdout
    assert f'File "{path}", line 16, in <lambda>\n    pydist.remotecall_fetch(lambda: ev(0), p)' in done.stdout
    assert re.search(r'File "<everywhere \w+>", line 2, in ev\n    return 1 / x', done.stdout), done.stdout
    assert "pydist/" not in done.stdout


# -- logging ---------------------------------------------------------------------------------------
def test_forward_logging_hands_worker_records_to_the_master(tmp_path, transport):
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(f"""
        import logging
        import time
        import pydist

        def task(x):
            logging.getLogger("app").info("task %d", x)
            logging.getLogger("other").debug("not forwarded")
            try:
                1 / 0
            except ZeroDivisionError:
                logging.getLogger("app").exception("boom")
            return x

        class Keep(logging.Handler):
            def __init__(self):
                super().__init__()
                self.seen = []

            def emit(self, record):
                self.seen.append((record.worker, record.name, record.levelname,
                                  record.getMessage(), "ZeroDivisionError" in (record.exc_text or "")))

        if __name__ == "__main__":
            keep = Keep()
            logging.getLogger().addHandler(keep)
            logging.getLogger().setLevel(logging.DEBUG)
            pydist.forward_logging("app", logging.INFO)
            with pydist.ProcessPoolExecutor(1, transport={transport!r}) as ex:
                ex.submit(task, 5).result()
                pid = ex.submit(pydist.myid).result()
            deadline = time.monotonic() + 10
            while len(keep.seen) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            print(keep.seen == [(pid, "app", "INFO", "task 5", False),
                                (pid, "app", "ERROR", "boom", True)], keep.seen)
    """))
    done = run(str(path), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True"), done.stdout


def test_a_script_that_makes_a_pool_at_import_breaks_it_as_spawn_does(tmp_path, transport):
    """No `if __name__ == "__main__":` guard: each worker runs the script, whose pool must
    not start workers of its own there; the master's pool breaks, as under spawn."""
    std, pd = both(tmp_path, transport, """
        def f(x):
            return x

        ex = ProcessPoolExecutor(1)
        print(ex.submit(f, 1).result())
    """)
    for done in (std, pd):
        assert done.returncode == 1, done.stderr
        assert done.stderr.rstrip().splitlines()[-1].startswith(
            "concurrent.futures.process.BrokenProcessPool: "), done.stderr
    assert "under `if __name__ == \"__main__\":`" in pd.stderr
