"""The pickle policy: plain pickle for what is importable, cloudpickle for the rest."""
from __future__ import annotations

import os.path
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from pydist.errors import SerializationError
from pydist.wire import serialize
from pydist.wire.serialize import PICKLE_PROTOCOL, dumps, loads

REPO = Path(serialize.__file__).resolve().parents[1]


def roundtrip(obj):
    data, buffers = dumps(obj)
    return loads(data, buffers)


@pytest.fixture
def no_cloudpickle(monkeypatch):
    """Fail the test if the slow path is taken."""
    def refuse(obj):
        raise AssertionError(f"cloudpickle used for {obj!r}")
    monkeypatch.setattr(serialize, "_cloudpickle_dumps", refuse)


def test_protocol_is_5():
    assert PICKLE_PROTOCOL == 5
    data, _ = dumps(1)
    assert data[:2] == b"\x80\x05"


def test_lambda():
    assert roundtrip(lambda x: x + 1)(2) == 3


def test_closure():
    k = 10

    def add(x):
        return x + k

    assert roundtrip(add)(5) == 15


def test_local_class_and_instance():
    class Point:
        def __init__(self, x):
            self.x = x

    p = roundtrip(Point(3))
    assert p.x == 3 and type(p).__name__ == "Point"


def test_main_function_travels_by_value(monkeypatch):
    # A function that plain pickle can pickle by reference to __main__, which another
    # process's __main__ would not have.
    code = compile("def square(x):\n    return x * x\n", "<script>", "exec")
    ns: dict = {"__name__": "__main__"}
    exec(code, ns)
    square = ns["square"]
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "square", square, raising=False)
    assert pickle.dumps(square, protocol=5).count(b"__main__") == 1  # plain pickle: by reference
    data, _ = dumps(square)
    monkeypatch.delattr(main, "square")           # as in a fresh process
    assert loads(data)(7) == 49


def test_main_class_travels_by_value(monkeypatch):
    Cls = types.new_class("Thing", exec_body=lambda ns: ns.update(value=lambda self: 42))
    Cls.__module__ = "__main__"
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "Thing", Cls, raising=False)
    data, _ = dumps(Cls())
    monkeypatch.delattr(main, "Thing")
    assert loads(data).value() == 42


def test_main_function_loads_in_another_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "f.pkl"
    make = (
        "import sys\n"
        "from pydist.wire.serialize import dumps\n"
        "def cube(x):\n    return x ** 3\n"
        "data, bufs = dumps((cube, (3,), {}))\n"
        "assert not bufs\n"
        f"open({str(out)!r}, 'wb').write(data)\n"
    )
    subprocess.run([sys.executable, "-c", make], check=True, env=env, timeout=60)
    use = f"import pickle\nf, args, kw = pickle.loads(open({str(out)!r}, 'rb').read())\nprint(f(*args, **kw))\n"
    res = subprocess.run([sys.executable, "-c", use], check=True, env=env, timeout=60,
                         capture_output=True, text=True)
    assert res.stdout.strip() == "27"


def test_importable_function_by_reference(no_cloudpickle):
    data, buffers = dumps((os.path.join, (1, 2), {}))
    assert not buffers
    assert os.path.join.__module__.encode() in data and b"join" in data
    assert len(data) < 80  # a reference, not a code object
    assert loads(data)[0] is os.path.join


def test_plain_data_takes_fast_path(no_cloudpickle):
    obj = {"a": [1, 2.5, "x"], "b": (None, True, b"bytes")}
    assert roundtrip(obj) == obj


def test_main_string_only_costs_the_slow_path():
    # A "__main__" string is a false positive of the cheap check: still correct.
    assert roundtrip(["__main__", 1]) == ["__main__", 1]


def test_out_of_band_buffers():
    arr = np.arange(1000, dtype=np.float64)
    data, buffers = dumps(arr)
    assert len(buffers) == 1
    assert isinstance(buffers[0], pickle.PickleBuffer)
    assert buffers[0].raw().nbytes == arr.nbytes
    assert len(data) < 1000  # the array's bytes are not in the pickle
    back = loads(data, buffers)
    np.testing.assert_array_equal(back, arr)
    with pytest.raises(pickle.UnpicklingError):
        loads(data)  # the buffers are required


def test_out_of_band_buffers_with_cloudpickle():
    arr = np.arange(10)
    data, buffers = dumps((lambda: 1, arr))
    assert len(buffers) == 1
    f, back = loads(data, buffers)
    assert f() == 1
    np.testing.assert_array_equal(back, arr)


def test_unpicklable_names_type_and_cause():
    with pytest.raises(SerializationError) as info:
        dumps((1, threading.Lock()))
    err = info.value
    assert isinstance(err, TypeError)
    assert "tuple" in str(err) and "lock" in str(err)
    assert err.__cause__ is not None


def test_unpicklable_generator():
    with pytest.raises(SerializationError, match="generator"):
        dumps(x for x in range(3))
