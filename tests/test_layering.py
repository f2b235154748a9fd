"""The layer arrows of docs/design.md: a module imports only its own layer and those below."""
from __future__ import annotations

import ast
import pathlib

import pydist

PACKAGE = pathlib.Path(pydist.__file__).parent

# Module (dotted, relative to pydist) -> layer. A folder's entry covers its modules.
LAYERS = {
    "errors": 0, "wire.messages": 0,
    "wire": 1,
    "transport": 2, "shm": 2, "net": 2, "testing": 2,
    "dropin": 4,
    "__init__": 5, "cli": 5, "__main__": 5,
}
DEFAULT_LAYER = 3          # the cluster layer: everything else
STDLIB_ONLY = {"errors", "wire.messages"}


def layer_of(module: str) -> int:
    head = module.split(".")[0]
    return LAYERS.get(module, LAYERS.get(head, DEFAULT_LAYER))


def pydist_imports(path: pathlib.Path) -> tuple[list[str], list[str]]:
    """(pydist modules imported, other top-level packages imported) by the file at ``path``."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package = list(rel.parts[:-1])
    inner, outer = [], []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
                inner.extend(n for n in names if n)
            elif node.module and node.module.startswith("pydist"):
                inner.append(node.module.removeprefix("pydist").lstrip(".") or "__init__")
            elif node.module:
                outer.append(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pydist."):
                    inner.append(alias.name.removeprefix("pydist."))
                else:
                    outer.append(alias.name.split(".")[0])
    return inner, outer


def modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_import_points_down_or_sideways():
    wrong = []
    for path in modules():
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        name = name.removesuffix(".__init__") if name != "__init__" else name
        mine = layer_of(name)
        inner, _ = pydist_imports(path)
        for target in inner:
            if layer_of(target) > mine:
                wrong.append(f"{name} (L{mine}) imports {target} (L{layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_vocabulary_needs_only_the_standard_library():
    import sys
    for name in STDLIB_ONLY:
        inner, outer = pydist_imports(PACKAGE / f"{name.replace('.', '/')}.py")
        third_party = [m for m in outer if m not in sys.stdlib_module_names and m != "__future__"]
        assert not third_party, f"{name} imports {third_party}"
        assert all(layer_of(m) == 0 for m in inner), f"{name} imports {inner}"
