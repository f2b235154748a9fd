"""The layer arrows of docs/design.md, read from every import in the package.

Every ``import`` and ``from ... import`` counts: at module level, inside a function, under
``if TYPE_CHECKING``. Each folder (and each module at the top of the package) belongs to one
layer; a module may import its own layer and those below, never above. Between modules there
is no cycle at all, and no module takes a private name (``_x``) from another folder, nor
reaches for a private member of another folder's classes (``obj._x``).
"""
from __future__ import annotations

import ast
import pathlib
import sys
from dataclasses import dataclass

import pydist

PACKAGE = pathlib.Path(pydist.__file__).parent

# Bottom to top. A name is a module at the top of the package or a folder (all its modules).
LAYERS: list[tuple[str, ...]] = [
    ("errors",),                                # L0 the vocabulary of failures
    ("wire",),                                  # L1 messages, pickling, frames, the hello
    ("transport", "net", "shm", "testing"),     # L2 moving frames of bytes
    ("cluster",),                               # L3 the process group and its connections
    ("refs",),                                  # L4 Future, RemoteChannel, remotecall
    ("managers",),                              # L5 how workers are launched
    ("processes",),                             # L6 addprocs/rmprocs, a worker's start
    ("pools",),                                 # L7 worker pools, pmap
    ("arrays",),                                # L8 shared arrays
    ("dropin",),                                # L9 the standard-library drop-ins
    ("__init__", "__main__", "cli", "worker"),  # L10 the package's face and commands
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
STDLIB_ONLY = ("errors", "wire.messages")


@dataclass(frozen=True)
class Import:
    source: str        # the importing module, dotted below pydist ("cluster.join")
    target: str        # the imported module ("refs.remoteref"), or "__init__" for pydist
    name: str | None   # the name taken from it, if any
    line: int


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def folder(module: str) -> str:
    """The folder a module lives in ("" for the top of the package)."""
    path = MODULES[module]
    return ".".join(path.relative_to(PACKAGE).parent.parts)


def layer(module: str) -> int:
    head = module.split(".")[0]
    return LAYER_OF.get(module, LAYER_OF.get(head, -1))


def _resolve(module: str, dotted: str) -> str:
    """``pydist.<dotted>`` as a module of MODULES: a submodule if there is one, else its package."""
    return dotted if dotted in MODULES else (dotted.rpartition(".")[0] or "__init__")


def imports(module: str, text: str | None = None) -> list[Import]:
    """Every import of a pydist module by ``module`` (its file, or ``text`` in its place),
    wherever in the file it stands."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" and module != "__init__" else \
        module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                where = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and (node.module == "pydist" or node.module.startswith("pydist.")):
                where = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                dotted = ".".join([*where, alias.name])
                if dotted in MODULES:          # from pydist.x import submodule
                    found.append(Import(module, dotted, None, node.lineno))
                else:
                    found.append(Import(module, ".".join(where) or "__init__", alias.name,
                                        node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "pydist" or alias.name.startswith("pydist."):
                    dotted = alias.name.removeprefix("pydist").lstrip(".")
                    found.append(Import(module, _resolve(module, dotted) if dotted else "__init__",
                                        None, node.lineno))
    return found


def all_imports() -> list[Import]:
    return [i for m in sorted(MODULES) for i in imports(m)]


def upward(found: list[Import]) -> list[str]:
    return [f"{i.source} (L{layer(i.source)}) imports {i.name or 'the module'} from {i.target} "
            f"(L{layer(i.target)}), line {i.line}"
            for i in found if layer(i.target) > layer(i.source)]


def cycles(found: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in found:
        if i.target != i.source:
            graph[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def private_across_folders(found: list[Import]) -> list[str]:
    return [f"{i.source} takes {i.name} from {i.target}, line {i.line}" for i in found
            if i.name and i.name.startswith("_") and not i.name.startswith("__")
            and folder(i.source) != folder(i.target)]


# -- private members of another folder's objects --------------------------------------------------
# ``x._name`` where ``x`` is an object or a module of another folder: read from the source
# alone, so a private name counts as another folder's when one of that folder's classes or
# modules defines it and nothing in the reading module's folder does.
# Allowed, each for a reason: (module, member) -> why.
ALLOWED: dict[tuple[str, str], str] = {
    ("dropin.state", "_waiters"):
        "threading.Condition's own waiter list (not an object of cluster/ or refs/, whose "
        "classes happen to use the same name), read to skip notify_all when no thread waits",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_members(module: str, text: str | None = None) -> set[str]:
    """The private names a module defines at its top (reached as ``module._x``) and its
    classes define: methods, ``self._x`` attributes, names assigned in the class body and
    ``__slots__`` entries."""
    tree = ast.parse(MODULES[module].read_text() if text is None else text)
    out: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out |= {stmt.name} if _private(stmt.name) else set()
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            out |= {t.id for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                    if isinstance(t, ast.Name) and _private(t.id)}
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for stmt in cls.body:
            targets = (stmt.targets if isinstance(stmt, ast.Assign)
                       else [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
            for t in targets:
                if isinstance(t, ast.Name) and _private(t.id):
                    out.add(t.id)
                elif isinstance(t, ast.Name) and t.id == "__slots__":
                    value = stmt.value
                    out |= {c.value for c in ast.walk(value) if value is not None
                            and isinstance(c, ast.Constant) and isinstance(c.value, str)
                            and _private(c.value)}
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
                out.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"
                  and _private(node.attr)):
                out.add(node.attr)
    return out


def folder_members() -> dict[str, set[str]]:
    """Each folder's (and the package top's, ``""``) private class members."""
    out: dict[str, set[str]] = {}
    for m in MODULES:
        out.setdefault(folder(m), set()).update(private_members(m))
    return out


def _accesses(tree: ast.AST) -> list[tuple[str, int]]:
    """``x._name`` (``x`` not ``self``/``cls``) and ``getattr``/``setattr``/``hasattr``/
    ``delattr(x, "_name", ...)``: the private names a module reaches for on objects."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                out.append((node.attr, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)
              and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))):
            out.append((node.args[1].value, node.lineno))
    return out


def private_uses(module: str, members: dict[str, set[str]], text: str | None = None,
                 allowed: dict[tuple[str, str], str] = ALLOWED) -> list[str]:
    """The private members of other folders' classes that ``module`` reaches for (by
    ``members``, a folder's private class members), less the ``allowed`` ones."""
    own = members.get(folder(module), set())
    tree = ast.parse(MODULES[module].read_text() if text is None else text)
    found = []
    for name, line in _accesses(tree):
        if name in own or (module, name) in allowed:
            continue
        for where, names in sorted(members.items()):
            if where != folder(module) and name in names:
                found.append(f"{module} uses {name} of an object of {where or 'the top'}/, "
                             f"line {line}")
    return found


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if layer(m) < 0]


def test_every_import_points_down_or_sideways():
    wrong = upward(all_imports())
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    found = cycles(all_imports())
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def test_no_private_name_crosses_a_folder():
    wrong = private_across_folders(all_imports())
    assert not wrong, "\n".join(wrong)


def test_no_private_member_crosses_a_folder():
    members = folder_members()
    wrong = [w for m in sorted(MODULES) for w in private_uses(m, members)]
    assert not wrong, "\n".join(wrong)


def test_every_allowed_private_member_is_still_used():
    """An exception that the code no longer needs goes from the list."""
    for (module, name), why in ALLOWED.items():
        assert why and name in {n for n, _ in _accesses(ast.parse(MODULES[module].read_text()))}


def test_the_private_member_check_fires():
    members = folder_members()
    planted = ("def f(pool, fut):\n"
               "    return pool._fcache, pool.workers(), PGRP._runner, fut._local_cell\n"
               "def g(fut):\n"
               "    return getattr(fut, '_pushed', None), hasattr(fut, 'rrid'), remoteref._fetch_ref\n")
    assert "_local_cell" not in members["refs"]       # (a name no folder defines: not flagged)
    assert private_uses("dropin.core", members, planted) == [
        "dropin.core uses _fcache of an object of pools/, line 2",
        "dropin.core uses _runner of an object of cluster/, line 2",
        "dropin.core uses _pushed of an object of refs/, line 4",
        "dropin.core uses _fetch_ref of an object of refs/, line 4"]
    assert private_uses("pools.mapper", members, planted) == [     # pools/ owns _fcache
        "pools.mapper uses _runner of an object of cluster/, line 2",
        "pools.mapper uses _pushed of an object of refs/, line 4",
        "pools.mapper uses _fetch_ref of an object of refs/, line 4"]
    assert private_uses("cluster.dispatch", members, "x = PGRP._runner\n") == []
    assert private_uses("dropin.core", members, "x = PGRP._runner\n",
                        {("dropin.core", "_runner"): "planted"}) == []


def test_the_checks_see_what_they_must():
    """Imports inside functions and under TYPE_CHECKING are in the graph, and each check
    fires on a planted case."""
    text = ("from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from ..refs import remoteref\n"
            "def f():\n    from ..refs.remotecall import remotecall_fetch\n"
            "    import pydist.wire.codec\n    from .. import cluster_cookie\n")
    found = imports("cluster.values", text)
    assert [(i.target, i.name) for i in found] == [
        ("refs.remoteref", None), ("refs.remotecall", "remotecall_fetch"), ("wire.codec", None),
        ("__init__", "cluster_cookie")]
    assert len(upward(found)) == 3
    planted = [Import("cluster.group", "refs.remotecall", "remotecall_fetch", 1),
               Import("refs.remotecall", "cluster.group", "PGRP", 1),
               Import("refs.remotecall", "cluster.dispatch", "_hidden", 1),
               Import("cluster.join", "cluster.dispatch", "_same_folder", 1)]
    assert upward(planted) == [
        "cluster.group (L3) imports remotecall_fetch from refs.remotecall (L4), line 1"]
    assert cycles(planted) == [["cluster.group", "refs.remotecall"]]
    assert private_across_folders(planted) == [
        "refs.remotecall takes _hidden from cluster.dispatch, line 1"]


def test_vocabulary_needs_only_the_standard_library():
    for name in STDLIB_ONLY:
        found = imports(name)
        assert all(layer(i.target) == 0 for i in found), f"{name} imports {found}"
        tree = ast.parse(MODULES[name].read_text())
        outer = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
        outer |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and not n.level and n.module}
        third_party = sorted(m for m in outer if m not in sys.stdlib_module_names
                             and m != "__future__")
        assert not third_party, f"{name} imports {third_party}"
