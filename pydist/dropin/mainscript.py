"""The master's main script on the drop-ins' workers, as the standard library's spawn has it.

The master finds its main script (``main_spec``: a file, or a module run with ``-m``); each
worker an executor starts runs it once, before the initializer, as ``__mp_main__``, with the
master's ``sys.path`` and ``sys.argv``, and makes it its ``__main__`` (``_load_main``). Its
``if __name__ == "__main__":`` part does not run there. Functions and classes of the script
then travel by reference (``serialize.MainRef``, and ``serialize.dumps(..., main_by_reference=True)``
for arguments), so that they share the script's globals on the worker. Without a script to
run (``-c``, an interactive session, a notebook) they travel by value instead.

A script is compiled once, here (``main_code``, kept while its file is unchanged), and its
code travels to the workers marshalled: compiling a long script on every new worker would
cost more than forking it. A worker of another Python version compiles it itself.
"""
from __future__ import annotations

import importlib.util
import marshal
import os
import sys
import types
from typing import Any

__all__ = ["main_spec", "main_code", "check_not_importing_main"]

_importing: list[bool] = []      # non-empty while this worker runs the main script


def main_spec() -> tuple[str, str] | None:
    """How a worker can run this process's main script: ``("path", file)`` or ``("module",
    name)`` (``python -m name``); ``None`` when there is none to run (``-c``, an interactive
    session, a notebook), and then ``__main__`` travels by value."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if name is not None:
        if name == "__main__" or name.endswith(".__main__"):
            return None
        return ("module", name)
    path = getattr(main, "__file__", None)
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    if os.path.splitext(path)[1] not in (".py", ""):    # a zip application, a .pyc: by value
        return None
    return ("path", os.path.abspath(path))


_main_loaded: list[tuple[str, str]] = []
_compiled: dict[str, tuple[tuple[int, int], tuple[bytes, bytes]]] = {}   # file -> (stat, code)


def main_code(spec: tuple[str, str] | None) -> tuple[bytes, bytes] | None:
    """The main script ``spec`` names, compiled here and marshalled, with this Python's
    bytecode magic number: ``(magic, code)``; ``None`` for a module (its loader has a
    cached compilation) or a script that cannot be read or compiled (the worker then
    tries itself, and reports the error)."""
    if spec is None or spec[0] != "path":
        return None
    where = spec[1]
    try:
        st = os.stat(where)
        stamp = (st.st_mtime_ns, st.st_size)
        cached = _compiled.get(where)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(where, "rb") as f:
            code = compile(f.read(), where, "exec")
    except Exception:       # (a SyntaxError, an unreadable file ...: the worker says which)
        return None
    packed = (importlib.util.MAGIC_NUMBER, marshal.dumps(code))
    _compiled[where] = (stamp, packed)
    return packed


def _script_code(where: str, compiled: tuple[bytes, bytes] | None) -> Any:
    """The code of the script at ``where``: the master's compilation when this Python
    reads it, else compiled here."""
    if compiled is not None and compiled[0] == importlib.util.MAGIC_NUMBER:
        return marshal.loads(compiled[1])
    with open(where, "rb") as f:
        return compile(f.read(), where, "exec")


def _load_main(spec: tuple[str, str], path: list[str], argv: list[str],
               compiled: tuple[bytes, bytes] | None = None) -> None:
    """Run the master's main script here as ``__mp_main__`` (once), and make it ``__main__``;
    ``sys.path`` gets the master's entries first and ``sys.argv`` is the master's, as in a
    child the standard library spawns. ``compiled``: the script as ``main_code`` gave it."""
    if spec in _main_loaded:
        return
    sys.path[:0] = [p for p in path if p not in sys.path]
    sys.argv[:] = argv
    kind, where = spec
    if kind == "module":
        found = importlib.util.find_spec(where)
        if found is None or found.loader is None:
            raise ImportError(f"the main module {where!r} cannot be found on a worker")
        code = found.loader.get_code(where)     # type: ignore[attr-defined]  # a source or bytecode loader's
        file = found.origin
    else:
        code = _script_code(where, compiled)
        file = where
    module = types.ModuleType("__mp_main__")
    module.__file__ = file
    module.__builtins__ = __builtins__    # type: ignore[attr-defined]  # ModuleType does not declare it
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    _main_loaded.append(spec)
    _importing.append(True)
    try:
        exec(code, vars(module))    # its `if __name__ == "__main__":` part does not run
    finally:
        _importing.clear()


def check_not_importing_main() -> None:
    """Refuse to make a pool while the main script is being run as ``__mp_main__``: its
    workers would run the script again, and theirs, without end."""
    if _importing:
        raise RuntimeError(
            "a process pool was created while a worker was running the main script as "
            "__mp_main__ (each worker runs it once, as the standard library's spawn does); "
            "put the code that creates pools under `if __name__ == \"__main__\":`")
