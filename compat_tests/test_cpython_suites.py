"""CPython's own tests of ``ProcessPoolExecutor`` and ``multiprocessing.Pool``, run against
pydist's classes.

The tests are imported at run time from the interpreter's ``test`` package (never copied
here): ``test.test_concurrent_futures`` (one module up to 3.12, a package since) and the
Pool tests of ``test._test_multiprocessing``. Some Python builds leave the ``test``
package (or parts of it) out; then the missing half is skipped, saying so.

How the classes are substituted:

* ``concurrent.futures``: every test class built for ``ProcessPoolExecutor`` with the
  ``spawn`` start method (pydist ignores ``mp_context``, so the fork and forkserver
  copies would only repeat it) is subclassed with ``executor_type`` set to
  ``pydist.ProcessPoolExecutor``; the test modules' global ``futures`` is swapped for a
  stand-in whose ``ProcessPoolExecutor`` is pydist's, for tests that name the class.
* ``multiprocessing``: the Pool test classes are given ``Pool = pydist.Pool``; the test
  module's global ``multiprocessing`` is swapped for a stand-in whose ``Pool`` is pydist's.

``EXPECTED`` lists every test not expected to pass, with the reason: ``skip`` for tests
that look inside the standard library's machinery (or run the standard library itself in
a child interpreter), ``xfail`` for behaviour where pydist differs on purpose (see
DIVERGENCES.md). An ``xfail`` that passes is reported as a failure, so the table stays true.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import pkgutil
import types
import unittest

import pydist

# -- what is not expected to pass, and why ---------------------------------------------------------
INTERNALS = "inspects the standard library's internals ({})"
CHILD = "runs the standard library's own class in a child interpreter ({})"

EXPECTED: dict[str, tuple[str, str]] = {
    # concurrent.futures -------------------------------------------------------------------------
    "ProcessPoolExecutorTest.test_killed_child": (
        "xfail", "divergence: a killed worker fails only its task and is replaced; the "
                 "executor is not broken, so a later submit succeeds"),
    "ProcessPoolExecutorTest.test_max_workers_too_large": (
        "skip", "Windows only"),
    "ExecutorShutdownTest.test_interpreter_shutdown": (
        "skip", CHILD.format("concurrent.futures.ProcessPoolExecutor; pydist's exit "
                             "behaviour is tested in test_executor_compat.py")),
    "ExecutorShutdownTest.test_submit_after_interpreter_shutdown": (
        "skip", CHILD.format("concurrent.futures.ProcessPoolExecutor; pydist's exit "
                             "behaviour is tested in test_executor_compat.py")),
    "ExecutorShutdownTest.test_hang_gh83386": (
        "skip", CHILD.format("concurrent.futures.ProcessPoolExecutor")),
    "ProcessPoolShutdownTest.test_del_shutdown": (
        "skip", INTERNALS.format("_executor_manager_thread, _call_queue")),
    "ProcessPoolShutdownTest.test_shutdown_no_wait": (
        "skip", INTERNALS.format("_executor_manager_thread, _call_queue")),
    "ExecutorDeadlockTest.test_error_at_task_unpickle": (
        "xfail", "divergence: an argument that fails to unpickle on the worker fails its "
                 "task with that error (UnpicklingError), it does not break the pool"),
    "ExecutorDeadlockTest.test_error_during_result_unpickle_in_result_handler": (
        "xfail", "divergence: a result that fails to unpickle fails its task with that error "
                 "(UnpicklingError), it does not break the pool"),
    # multiprocessing.Pool -----------------------------------------------------------------------
    "_TestPoolWorkerErrors.test_unpickleable_result": (
        "xfail", "divergence: pydist pickles lambdas (cloudpickle), so the result the test "
                 "means to be unpicklable arrives fine"),
    "_TestPoolWorkerLifetime.test_worker_finalization_via_atexit_handler_of_multiprocessing": (
        "skip", CHILD.format("multiprocessing.Pool; pydist's exit behaviour is tested in "
                             "test_pool_compat.py")),
}


def _expectation(cls: type, name: str) -> tuple[str, str] | None:
    """The EXPECTED entry for test ``name`` of ``cls``, by the class that defines it."""
    for klass in cls.__mro__:
        if name in vars(klass) and klass.__module__ != __name__:
            return EXPECTED.get(f"{klass.__name__}.{name}")
    return None


def _apply_expectations(cls: type) -> type:
    for name in dir(cls):
        if not name.startswith("test"):
            continue
        entry = _expectation(cls, name)
        if entry is None:
            continue
        kind, reason = entry
        method = getattr(cls, name)
        if kind == "skip":
            setattr(cls, name, unittest.skip(reason)(method))
        else:
            setattr(cls, name, unittest.expectedFailure(method))
    return cls


def _import(name: str) -> tuple[types.ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except unittest.SkipTest as e:
        return None, f"{name} skips itself here: {e}"
    except ImportError as e:
        return None, f"this Python does not ship {name} ({e})"


class _Standin(types.ModuleType):
    """A module that is ``real`` except for the names given."""

    def __init__(self, real: types.ModuleType, **names: object) -> None:
        super().__init__(real.__name__)
        self.__dict__.update(names)
        self._real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


_swaps: list[tuple[types.ModuleType, str, object]] = []


def _swap(module: types.ModuleType, name: str, value: object) -> None:
    if name in vars(module):
        _swaps.append((module, name, vars(module)[name]))
        setattr(module, name, value)


def setup_module() -> None:
    for module in _cf_modules:
        _swap(module, "futures", _Standin(concurrent.futures,
                                          ProcessPoolExecutor=pydist.ProcessPoolExecutor))
    if _mp is not None:
        _swap(_mp, "multiprocessing", _Standin(multiprocessing, Pool=pydist.Pool))


def teardown_module() -> None:
    while _swaps:
        module, name, value = _swaps.pop()
        setattr(module, name, value)


# -- concurrent.futures --------------------------------------------------------------------------
def _cf_test_modules() -> tuple[list[types.ModuleType], str]:
    pkg, why = _import("test.test_concurrent_futures")
    if pkg is None:
        return [], why
    if not hasattr(pkg, "__path__"):
        return [pkg], ""
    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("test_") and info.name not in ("test_future", "test_thread_pool"):
            mod, why = _import(f"{pkg.__name__}.{info.name}")
            if mod is not None:
                mods.append(mod)
    for helper in ("util", "executor"):
        mod, _ = _import(f"{pkg.__name__}.{helper}")
        if mod is not None:
            mods.append(mod)
    return mods, ""


_cf_modules, _cf_missing = _cf_test_modules()
_cf_classes: dict[str, type] = {}
for _module in _cf_modules:
    for _name, _cls in list(vars(_module).items()):
        if (isinstance(_cls, type) and issubclass(_cls, unittest.TestCase)
                and getattr(_cls, "executor_type", None) is concurrent.futures.ProcessPoolExecutor
                and getattr(_cls, "ctx", None) == "spawn" and _cls.__module__ == _module.__name__):
            _sub = type(f"TestPydist_{_name}", (_cls,), {
                "executor_type": pydist.ProcessPoolExecutor, "__module__": __name__,
                "__qualname__": f"TestPydist_{_name}"})
            _cf_classes[_sub.__name__] = _apply_expectations(_sub)
globals().update(_cf_classes)

if not _cf_classes:
    class TestConcurrentFuturesSuite(unittest.TestCase):
        @unittest.skip(_cf_missing or "no ProcessPoolExecutor test classes found in "
                                      "test.test_concurrent_futures")
        def test_suite_available(self) -> None:
            pass


# -- multiprocessing.Pool ------------------------------------------------------------------------
_mp, _mp_missing = _import("test._test_multiprocessing")

if _mp is not None:
    class _PydistProcessesMixin(_mp.ProcessesMixin):
        Pool = staticmethod(pydist.Pool)

    def _pool_class(base: type, name: str, only: tuple[str, ...] = ()) -> type:
        body: dict[str, object] = {"__module__": __name__, "__qualname__": name}
        bases = (base, _PydistProcessesMixin, unittest.TestCase)
        if issubclass(base, unittest.TestCase):
            bases = (base,)
        cls = type(name, bases, body)
        if only:
            for attr in dir(cls):
                if attr.startswith("test") and attr not in only:
                    setattr(cls, attr, None)
        return _apply_expectations(cls)

    TestPydistPool = _pool_class(_mp._TestPool, "TestPydistPool")
    TestPydistPoolWorkerErrors = _pool_class(_mp._TestPoolWorkerErrors, "TestPydistPoolWorkerErrors")
    TestPydistPoolWorkerLifetime = _pool_class(_mp._TestPoolWorkerLifetime,
                                               "TestPydistPoolWorkerLifetime")
    if hasattr(_mp, "TestInitializers"):
        TestPydistPoolInitializer = _pool_class(_mp.TestInitializers, "TestPydistPoolInitializer",
                                                only=("test_pool_initializer",))
else:
    class TestMultiprocessingPoolSuite(unittest.TestCase):
        @unittest.skip(_mp_missing)
        def test_suite_available(self) -> None:
            pass


def test_substitution_is_in_place() -> None:
    """The runner really runs pydist's classes (not the standard library's)."""
    for cls in _cf_classes.values():
        assert cls.executor_type is pydist.ProcessPoolExecutor
    if _mp is not None:
        assert TestPydistPool.Pool is pydist.Pool
        setup_module()
        try:
            assert _mp.multiprocessing.Pool is pydist.Pool
            assert _mp.multiprocessing.pool is multiprocessing.pool
        finally:
            teardown_module()


def _count(classes: list[type]) -> tuple[int, int]:
    """(tests, tests this runner skips) in ``classes``."""
    total = skipped = 0
    for cls in classes:
        for name in unittest.TestLoader().getTestCaseNames(cls):
            entry = _expectation(cls, name)
            total += 1
            skipped += entry is not None and entry[0] == "skip"
    return total, skipped


def test_most_tests_run() -> None:
    """At least 90 % of each suite present runs against pydist (the rest is in EXPECTED)."""
    suites = [list(_cf_classes.values())]
    if _mp is not None:
        suites.append([c for name, c in globals().items()
                       if name.startswith("TestPydistPool") and isinstance(c, type)])
    for classes in suites:
        total, skipped = _count(classes)
        if total:
            assert (total - skipped) / total >= 0.9, (total, skipped)
