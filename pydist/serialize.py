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

import copyreg
import io
import pickle
from collections import ChainMap
from typing import Any, Iterable, Mapping

from .errors import SerializationError

__all__ = ["PICKLE_PROTOCOL", "dumps", "dumps_with", "loads"]

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
    except Exception as e:
        raise SerializationError(
            f"cannot pickle an object of type {_type_name(obj)} for another process: "
            f"{type(e).__name__}: {e}"
        ) from e
    return out.getvalue(), buffers


def dumps_with(obj: Any, reducers: Mapping[type, Any]) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """``dumps``, with ``reducers`` (type -> reduce function) consulted before the usual
    ``copyreg`` table, by both picklers."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    pickler.dispatch_table = ChainMap(reducers, copyreg.dispatch_table)  # type: ignore[arg-type]
    try:
        pickler.dump(obj)
    except Exception:
        pass
    else:
        if _MAIN_MARK not in out.getvalue():
            return out.getvalue(), buffers
    buffers, out = [], io.BytesIO()
    try:
        import cloudpickle   # on first need, as in _cloudpickle_dumps
        # The C pickler reads the table when made, and cloudpickle's class sets its own.
        table = ChainMap(reducers, cloudpickle.Pickler.dispatch_table)
        cls = type("_Pickler", (cloudpickle.Pickler,), {"dispatch_table": table})
        cls(out, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append).dump(obj)
    except Exception as e:
        raise SerializationError(
            f"cannot pickle an object of type {_type_name(obj)} for another process: "
            f"{type(e).__name__}: {e}"
        ) from e
    return out.getvalue(), buffers


def loads(data: bytes | bytearray | memoryview, buffers: Iterable[Any] = ()) -> Any:
    """Unpickle ``data``, taking out-of-band buffers from ``buffers`` in order."""
    return pickle.loads(data, buffers=buffers)


def _type_name(obj: Any) -> str:
    """The qualified name of ``obj``'s type, e.g. ``builtins.tuple``."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
