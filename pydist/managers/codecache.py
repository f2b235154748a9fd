"""Compiled code for forked workers: the program's own modules, compiled once by the server.

Where Python writes no bytecode cache (``PYTHONDONTWRITEBYTECODE``, a read-only
directory), every process that imports one of the program's own modules compiles its
source again: a few milliseconds a module. A drop-in's worker imports the modules its
main script imports, so each new worker paid that. Instead:

1. With each fork request the master names the modules it has imported from the directory
   of its main script (the program's own; the current directory when there is no script)
   that have no bytecode cache (``uncached_sources``).
2. The worker server compiles each one it has not imported itself (``compile_sources``):
   compiling runs nothing of the module, so nothing of it happens in the server.
3. Its forked children find that code when they import the module (``install``: the
   source loader's ``source_to_code``), provided the file still holds the very bytes that
   were compiled; anything else is compiled as usual.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
from types import CodeType
from typing import Any

__all__ = ["uncached_sources", "compile_sources", "install"]

MAX_FILES = 64               # modules compiled for the children, at most
MAX_BYTES = 4 << 20          # bytes of source compiled for the children, at most
_compiled: dict[str, tuple[bytes, CodeType]] = {}      # path -> (source, code)
_budget = [MAX_FILES, MAX_BYTES]


def _program_dir() -> str:
    """The directory of the program's own modules: its main script's, else the current one."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if isinstance(path, str) and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return os.getcwd()


def uncached_sources(seen: set[str]) -> list[tuple[str, str]]:
    """(On the master.) ``(module, file)`` for each module imported here from the program's
    directory whose bytecode is cached nowhere (never pydist's own: the server has what a
    worker needs); ``seen``, the names looked at before, is updated."""
    base = _program_dir() + os.sep
    out = []
    for name, module in list(sys.modules.items()):
        if name in seen:
            continue
        seen.add(name)
        path = getattr(module, "__file__", None)
        if (name in ("__main__", "__mp_main__") or name.partition(".")[0] == "pydist"
                or not isinstance(path, str) or not path.endswith(".py")
                or not path.startswith(base)):
            continue
        cached = getattr(module, "__cached__", None)
        if isinstance(cached, str) and os.path.exists(cached):
            continue
        out.append((name, path))
    return out


def compile_sources(sources: list[tuple[str, str]]) -> None:
    """(In the server.) Compile the modules of ``sources`` it has not imported itself
    (its children have those), within the budget; one that cannot be read or compiled is
    left for the child to compile (and report)."""
    for name, path in sources:
        if name in sys.modules or path in _compiled or _budget[0] <= 0:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
            if len(data) > _budget[1]:
                continue
            code = compile(data, path, "exec", dont_inherit=True)
        except (OSError, SyntaxError, ValueError):
            continue
        _compiled[path] = (data, code)
        _budget[0] -= 1
        _budget[1] -= len(data)


_plain_source_to_code = importlib.machinery.SourceFileLoader.source_to_code


def _source_to_code(self: Any, data: Any, path: Any, *, _optimize: int = -1) -> Any:
    """The source loader's ``source_to_code``, answering from the compiled modules when
    the file holds the bytes compiled."""
    hit = _compiled.get(path) if _optimize == -1 else None
    if hit is not None and hit[0] == data:
        return hit[1]
    return _plain_source_to_code(self, data, path, _optimize=_optimize)


def install() -> None:
    """(In the server, before it forks.) Let imports use the compiled modules."""
    # (mypy forbids assigning to a method; the loader's hook is replaced on purpose)
    importlib.machinery.SourceFileLoader.source_to_code = _source_to_code   # type: ignore[method-assign]
