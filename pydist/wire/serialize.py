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

``dumps(obj, main_by_reference=True)`` keeps the first pickler's references to ``__main__``:
for a receiver that runs the same main script (as the drop-ins' workers do, under the name
``__mp_main__``, as the standard library's spawn does).

Functions of ``__main__`` pickled by value share one namespace on the receiver: its
``__main__`` (Julia's ``Main``). The globals such a function refers to travel with it and
land there, each tagged with a version that changes when the sender rebinds the name; the
receiver sets a global it lacks, or one it got from the sender in an older version, and
keeps the rest -- so what an initializer or a task assigned to a global of ``__main__`` on
a worker stays for the later tasks (an object changed in place on the sender is not sent
again). This uses cloudpickle's function reducer (``_MainPickler``), hence the pinned range
of cloudpickle versions in ``pyproject.toml``.

Both outputs load with the plain ``pickle.loads`` (given cloudpickle on the receiver).

Only the standard library, cloudpickle and ``pydist.errors`` are imported (layer L1).
"""
from __future__ import annotations

import copyreg
import importlib
import io
import linecache
import pickle
import pickletools
import sys
import threading
import types
import weakref
from collections import ChainMap
from collections.abc import Iterable, MutableMapping
from typing import Any, cast

from ..errors import PydistError, SerializationError, set_exception_pickler

__all__ = ["PICKLE_PROTOCOL", "dumps", "dumps_with", "loads", "main_namespace", "MainRef",
           "main_attr"]

PICKLE_PROTOCOL = 5

# The bytes every by-reference pickle of a __main__ object contains.
_MAIN_MARK = b"__main__"


def dumps(obj: Any, main_by_reference: bool = False) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj``: the pickle bytes and the out-of-band buffers, in order
    (``main_by_reference``: for a receiver that has this process's main script).

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
        if main_by_reference or _MAIN_MARK not in data:
            return data, buffers
    return _cloudpickle_dumps(obj)


def _cloudpickle_dumps(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj`` with cloudpickle (by value for __main__ and unimportable code)."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    try:
        _main_pickler()(out, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append).dump(obj)
    except PydistError:
        raise
    except Exception as e:
        raise _cannot_pickle(obj, e) from e
    return out.getvalue(), buffers


def _cannot_pickle(obj: Any, e: Exception) -> SerializationError:
    return SerializationError(f"cannot pickle an object of type {_type_name(obj)} for another "
                              f"process: {type(e).__name__}: {e}")


def dumps_with(obj: Any, reducers: MutableMapping[type, Any],
               main_by_reference: bool = False) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """``dumps``, with ``reducers`` (type -> reduce function) consulted before the usual
    ``copyreg`` table, by both picklers."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    table: ChainMap[type, Any] = ChainMap(reducers, copyreg.dispatch_table)
    pickler.dispatch_table = table
    try:
        pickler.dump(obj)
    except Exception:
        pass
    else:
        if main_by_reference or _MAIN_MARK not in out.getvalue():
            return out.getvalue(), buffers
    buffers, out = [], io.BytesIO()
    try:
        base = _main_pickler()   # as in _cloudpickle_dumps: __main__ bound on the receiver
        # The C pickler reads the table when made, and the class sets its own.
        table = ChainMap(reducers, cast("MutableMapping[type, Any]", base.dispatch_table))
        cls = type("_Pickler", (base,), {"dispatch_table": table})
        cls(out, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append).dump(obj)
    except Exception as e:
        raise _cannot_pickle(obj, e) from e
    return out.getvalue(), buffers


# -- functions of __main__ by value: one namespace on the receiver ------------------------------------
_pickler: list[type[pickle.Pickler]] = []                          # _MainPickler, made on first need
_sent: dict[str, tuple[Any, int]] = {}             # sender: global name -> (value or weakref, version)
_got: dict[str, int] = {}                          # receiver: global name -> version set here
_versions_lock = threading.Lock()
_MISSING = object()


def _main_pickler() -> type[pickle.Pickler]:
    """cloudpickle's Pickler, with ``__main__`` functions bound to the receiver's ``__main__``."""
    if not _pickler:
        import cloudpickle  # on first need: workers that run importable code never load it

        class _MainPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no type hints
            # Code keeps its file name (cloudpickle puts "<dynamic-code>"): tracebacks of
            # it elsewhere name the user's file, and show its lines where they can be read.
            dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)

            def _dynamic_function_reduce(self, func: Any) -> Any:
                reduced = super()._dynamic_function_reduce(func)
                main = sys.modules.get("__main__")
                if main is None or func.__globals__ is not vars(main):
                    return reduced
                make, (code, _, name, defaults, closure), (state, slots) = reduced[:3]
                shared = _tag_versions(slots["__globals__"])
                slots["__globals__"] = {}
                return (make, (code, _MainNamespace(), name, defaults, closure),
                        (state, slots, shared, _source_of(code)), None, None,
                        _set_main_function_state)
        _pickler.append(_MainPickler)
    return _pickler[0]


def _code_reduce(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with the code's own file name."""
    from cloudpickle.cloudpickle import _code_reduce as reduce_code
    make, args = reduce_code(code)
    at = [i for i, a in enumerate(args) if isinstance(a, str) and a == "<dynamic-code>"]
    if len(at) == 1:
        args = (*args[:at[0]], code.co_filename, *args[at[0] + 1:])
    return make, args


class MainRef:
    """A function or class of the main script, to a receiver that runs that script too
    (the drop-ins' workers): unpickles as the attribute ``qualname`` of its ``__main__``."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __reduce__(self) -> tuple[Any, ...]:
        return (main_attr, (self.qualname,))


def main_attr(qualname: str) -> Any:
    """The object ``qualname`` of this process's ``__main__``."""
    obj: Any = sys.modules["__main__"]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _MainNamespace:
    """Unpickles as the receiver's ``__main__`` namespace."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (main_namespace, ())


def main_namespace() -> dict[str, Any]:
    """This process's ``__main__`` namespace."""
    return vars(sys.modules["__main__"])


def _tag_versions(shared: dict[str, Any]) -> dict[str, tuple[Any, int]]:
    """Each global with its version: a new one whenever this process rebound the name."""
    out = {}
    with _versions_lock:
        for name, value in shared.items():
            seen = _sent.get(name)
            if seen is None or _referent(seen[0]) is not value:
                seen = _sent[name] = (_reference(value), (seen[1] + 1) if seen else 1)
            out[name] = (value, seen[1])
    return out


def _reference(value: Any) -> Any:
    """A weak reference to ``value`` where it takes one (a big array is not kept alive
    here once the sender rebinds the name), else the value itself."""
    try:
        return weakref.ref(value)
    except TypeError:
        return value


def _referent(ref: Any) -> Any:
    return ref() if type(ref) is weakref.ref else ref


def _source_of(code: Any) -> tuple[str, tuple[Any, ...]] | None:
    """The source lines of ``code`` when they exist only in this process's ``linecache``
    (a notebook cell, code run by ``everywhere``): sent along, so that tracebacks of the
    function elsewhere show its lines."""
    entry = linecache.cache.get(code.co_filename)
    if entry is None or len(entry) != 4 or entry[1] is not None:
        return None      # a real file (the receiver reads it) or nothing known
    return code.co_filename, entry


def _set_main_function_state(func: Any, state: tuple[Any, ...]) -> None:
    """Bind a function of the sender's ``__main__`` into ours (see the module's docstring)."""
    from cloudpickle.cloudpickle import _function_setstate  # loaded by the pickle already
    fstate, slots, shared, source = state
    if source is not None:
        linecache.cache.setdefault(*source)
    namespace = func.__globals__
    with _versions_lock:
        for name, (value, version) in shared.items():
            if name not in namespace or _got.get(name, version) < version:
                namespace[name] = value
                _got[name] = version
    builtins = namespace.get("__builtins__", _MISSING)
    _function_setstate(func, (fstate, slots))
    if builtins is not _MISSING:      # cloudpickle sets its own; ours stay
        namespace["__builtins__"] = builtins


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
    memo: dict[object, Any] = {}
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
