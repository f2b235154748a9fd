"""MkDocs hooks for the pydist site (named in mkdocs.yml; run by ``mkdocs build``).

1. Every public name (``pydist.__all__``, and the public methods and properties that pydist
   defines on those classes) must have a docstring: a missing one is a warning, which
   ``mkdocs build --strict`` turns into a failure.
2. The API reference (reference.md) covers every name of ``pydist.__all__``: a name that
   the page does not list yet is appended under "Other names", so a new public name is
   documented on the next build.
3. The pages in docs/ link to files of the repository outside docs/ (``../examples/x.py``,
   ``../bench/bench.py``) so that they work when read on the forge; on the site such a link
   points to the file in the repository. A link to a file that does not exist is left as
   it is, and MkDocs reports it.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
from typing import Any

log = logging.getLogger("mkdocs.plugins.pydist")
LINK = re.compile(r"\]\((\.\./[^)#\s]+)(#[^)\s]*)?\)")


def _undocumented() -> list[str]:
    import pydist  # the package documented; imported when the site is built
    missing = []
    for name in pydist.__all__:
        obj = getattr(pydist, name)
        if not (inspect.isclass(obj) or callable(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            missing += [f"{name}.{m}" for m in _public_members(obj) if not _member_doc(obj, m)]
    return missing


def _public_members(cls: type) -> list[str]:
    own = [c for c in cls.__mro__ if c.__module__.startswith("pydist")]
    names = {k for c in own for k in vars(c) if not k.startswith("_")}
    return sorted(k for k in names if callable(inspect.getattr_static(cls, k))
                  or isinstance(inspect.getattr_static(cls, k), property))


def _member_doc(cls: type, name: str) -> str | None:
    static = inspect.getattr_static(cls, name)
    if isinstance(static, property):
        return static.__doc__
    return inspect.getdoc(getattr(cls, name))


def on_pre_build(config: Any) -> None:
    for name in _undocumented():
        log.warning(f"pydist.{name} is public but has no docstring")


def _complete_reference(markdown: str) -> str:
    import pydist
    listed = {m.group(1) for m in re.finditer(r"^::: pydist\.(?:\w+\.)*(\w+)\s*$", markdown, re.M)}
    for m in re.finditer(r"<!-- aliases: ([\w, ]+) -->", markdown):   # names shown under another
        listed.update(a.strip() for a in m.group(1).split(","))
    lazy = getattr(pydist, "_LAZY", {})
    missing = [n for n in pydist.__all__ if n not in listed]
    if not missing:
        return markdown
    lines = [f"::: pydist{lazy[n]}.{n}" if n in lazy else f"::: pydist.{n}" for n in missing]
    return markdown.rstrip() + "\n\n## Other names\n\n" + "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_path == "reference.md":
        markdown = _complete_reference(markdown)
    repo_url = config.get("repo_url") or ""
    docs_dir = config["docs_dir"]
    page_dir = os.path.dirname(os.path.join(docs_dir, page.file.src_path))
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))

    def rewrite(m: re.Match) -> str:
        target = os.path.normpath(os.path.join(page_dir, m.group(1)))
        if target.startswith(os.path.abspath(docs_dir)) or not os.path.exists(target):
            return m.group(0)
        rel = os.path.relpath(target, root)
        kind = "tree" if os.path.isdir(target) else "blob"
        return f"]({repo_url.rstrip('/')}/{kind}/main/{rel}{m.group(2) or ''})"

    return LINK.sub(rewrite, markdown)
