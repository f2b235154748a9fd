"""The pickle policy: how objects become bytes for another process, and back.

Every object is pickled with protocol 5, and the buffers that objects such as numpy arrays
offer out of band are collected rather than copied into the pickle: ``dumps`` returns the
pickle and that list, and the codec sends the buffers as separate parts of the frame.

Two picklers, tried in order:

1. The C ``pickle`` pickler. Fast (about a microsecond for a small call envelope) and
   enough for everything importable: module-level functions and classes travel by
   reference (their module and name).
2. ``cloudpickle``, when the first fails (lambdas, closures, local classes) or when its
   output mentions ``__main__``: a function or class of the main script pickled by
   reference could not be found in a worker, whose ``__main__`` is another program.
   cloudpickle pickles those by value instead. The check is a substring search, so a stray
   ``"__main__"`` string in the data only costs the slower pickler, never correctness.

Both outputs load with the plain ``pickle.loads``.

Only the standard library, cloudpickle and ``pydist.errors`` are imported (layer L1).
"""
from __future__ import annotations

import importlib
import io
import pickle
import pickletools
from typing import Any, Iterable

from .errors import PydistError, SerializationError, set_exception_pickler

__all__ = ["PICKLE_PROTOCOL", "dumps", "loads"]

PICKLE_PROTOCOL = 5

# The bytes every by-reference pickle of a __main__ object contains.
_MAIN_MARK = b"__main__"


def dumps(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj``: the pickle bytes and the out-of-band buffers, in order.

    Raises ``SerializationError`` (naming the object's type, chained from the pickler's
    error) when neither pickler can handle the object.
    """
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    except PydistError:
        raise   # pydist's own failure inside a __reduce__ (a reference's owner is gone)
    except Exception:
        # Lambdas, closures and the like: cloudpickle may still manage them.
        pass
    else:
        if _MAIN_MARK not in data:
            return data, buffers
    return _cloudpickle_dumps(obj)


def _cloudpickle_dumps(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj`` with cloudpickle (by value for __main__ and unimportable code)."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    try:
        import cloudpickle   # on first need: workers that run importable code never load it
        cloudpickle.Pickler(out, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append).dump(obj)
    except PydistError:
        raise
    except Exception as e:
        raise SerializationError(
            f"cannot pickle an object of type {_type_name(obj)} for another process: "
            f"{type(e).__name__}: {e}"
        ) from e
    return out.getvalue(), buffers


def loads(data: bytes | bytearray | memoryview, buffers: Iterable[Any] = ()) -> Any:
    """Unpickle ``data``, taking out-of-band buffers from ``buffers`` in order.

    When a class or function the pickle names cannot be imported here (a module that exists
    only on the sender), the ``ImportError``/``AttributeError`` raised names it.
    """
    try:
        return pickle.loads(data, buffers=buffers)
    except (ImportError, AttributeError) as e:
        missing = _missing_global(data)
        if missing is None:
            raise
        try:
            clearer = type(e)(f"cannot rebuild an object here: it needs {missing}, which this "
                              f"process cannot import ({type(e).__name__}: {e})")
        except Exception:   # an exception class with another signature: keep the original
            raise e from None
        raise clearer from e


def _missing_global(data: bytes | bytearray | memoryview) -> str | None:
    """The first ``module.QualName`` that ``data`` refers to and this process cannot find."""
    for module, name in _globals_of(data):
        try:
            obj: Any = importlib.import_module(module)
            for part in name.split("."):
                obj = getattr(obj, part)
        except Exception:
            return f"{module}.{name}"
    return None


def _globals_of(data: bytes | bytearray | memoryview) -> Iterable[tuple[str, str]]:
    """The (module, name) pairs of a pickle's GLOBAL and STACK_GLOBAL opcodes."""
    memo: dict[int, Any] = {}
    pushed: list[Any] = []
    try:
        for op, arg, _pos in pickletools.genops(bytes(data)):
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                yield module, name
            elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
                if isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                    yield pushed[-2], pushed[-1]
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            else:
                pushed.append(arg if isinstance(arg, str) else None)
    except Exception:   # a truncated or odd stream: report what was found so far
        return


def _type_name(obj: Any) -> str:
    """The qualified name of ``obj``'s type, e.g. ``builtins.tuple``."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _pickle_exception(ex: BaseException) -> bytes:
    """A captured exception's own pickle (in band: it travels inside another pickle)."""
    data, buffers = dumps(ex)
    return pickle.dumps(ex, protocol=PICKLE_PROTOCOL) if buffers else data


set_exception_pickler(_pickle_exception)
