"""Every program in examples/ runs, at a small size, as a user runs it.

Each ``examples/*.py`` (except modules whose name starts with ``_``: code the examples
import) is found automatically and run as ``python examples/NAME.py`` with
``PYDIST_EXAMPLES_SMALL=1``. An example that names a need in a ``# example-test: needs
the SSH lab`` line is run against the SSH lab's hosts. Each notebook runs in a real
Jupyter kernel (ipykernel, driven by nbclient), cell by cell, as a user runs it.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from sshlab import SSHLab

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
NEEDS_LAB = "# example-test: needs the SSH lab"
TIMEOUT = 180


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYDIST_EXAMPLES_SMALL="1", PYTHONUNBUFFERED="1")
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT, **kw)
    assert out.returncode == 0, f"{argv} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


def test_there_are_examples():
    assert len(SCRIPTS) + len(NOTEBOOKS) >= 6, [p.name for p in SCRIPTS + NOTEBOOKS]


@pytest.mark.parametrize("script", [p for p in SCRIPTS if NEEDS_LAB not in p.read_text()],
                         ids=lambda p: p.name)
def test_example_runs(script, leak_oracle):
    out = run([sys.executable, str(script)])
    assert out.stdout.strip(), f"{script.name} printed nothing"


# Run apart, so that the client's own sockets and threads are not counted as the test's.
RUN_NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=int(sys.argv[2]), kernel_name="python3",
               resources={"metadata": {"path": sys.argv[3]}}).execute()
for cell in nb.cells:
    for out in cell.get("outputs", []) if cell.cell_type == "code" else ():
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            sys.stdout.write(out["text"])
"""


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook, leak_oracle):
    """The cells' functions live in the kernel's ``__main__`` (no file to import them from);
    a cell's exception fails the run; the kernel's workers go when the kernel does."""
    assert any(c.cell_type == "code" and c.source.strip()
               for c in nbformat.read(notebook, as_version=4).cells), notebook.name
    out = run([sys.executable, "-c", RUN_NOTEBOOK, str(notebook), str(TIMEOUT), str(EXAMPLES)])
    assert out.stdout.strip(), f"{notebook.name} printed nothing"


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("script", [p for p in SCRIPTS if NEEDS_LAB in p.read_text()],
                         ids=lambda p: p.name)
def test_ssh_example_runs_on_the_lab(script):
    ok, reason = SSHLab.available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SSH examples: {reason}")
        pytest.skip(reason)
    with SSHLab(n_hosts=2) as lab:
        hosts = [h.spec for h in lab.hosts]
        out = run([sys.executable, str(script), *hosts, "--per-host", "1",
                   "--sshflags", " ".join(lab.sshflags), "--python", lab.python])
    names = {h.name for h in lab.hosts}
    assert all(name in out.stdout for name in names), out.stdout
