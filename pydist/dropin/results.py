"""What ``Pool.apply_async`` and ``Pool.map_async`` return, and where their tasks land.

An ``ApplyResult`` is both the caller's handle (``get``, ``wait``, ``ready``,
``successful``) and the sink the executor's machinery completes (``set_result``,
``set_exception``, as a ``concurrent.futures.Future`` would be); callbacks run on the
thread that completes it, before ``ready()`` turns true. A ``MapResult`` gathers the
chunks of a map, each through a ``_ChunkSink``, and is ready once every chunk is in.
"""
from __future__ import annotations

import multiprocessing
import threading
import traceback
from collections.abc import Callable
from typing import Any

from .futures import pump_for

TimeoutError = multiprocessing.TimeoutError


class ApplyResult:
    """The result of ``apply_async``: ``get``, ``wait``, ``ready``, ``successful``.

    It is also where the executor delivers the task (``set_result``/``set_exception``);
    callbacks run on the thread that delivers, before ``ready()`` turns true.
    """

    def __init__(self, callback: Callable[[Any], Any] | None = None,
                 error_callback: Callable[[BaseException], Any] | None = None) -> None:
        self._event = threading.Event()
        self._callback, self._error_callback = callback, error_callback
        self._success = True
        self._value: Any = None
        self._cancelled = False
        self.pid: int | None = None       # the worker running it (set by the executor)
        self._sent: Any = None            # see futures._await_sent

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        if timeout is None and not self._event.is_set():
            pump_for(self, self._event.is_set)
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    __class_getitem__ = classmethod(lambda cls, item: cls)

    # -- the executor's side -------------------------------------------------------------------
    def set_running_or_notify_cancel(self) -> bool:
        return not self._cancelled

    def cancel(self) -> bool:
        self._cancelled = True
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def set_result(self, value: Any) -> None:
        self._finish(True, value)

    def set_exception(self, exc: BaseException) -> None:
        self._finish(False, exc)

    def _finish(self, success: bool, value: Any) -> None:
        if self._event.is_set():
            return
        self._success, self._value = success, value
        try:
            if success and self._callback is not None:
                self._callback(value)
            elif not success and self._error_callback is not None:
                self._error_callback(value)
        except BaseException:
            traceback.print_exc()
        finally:
            self._event.set()


AsyncResult = ApplyResult


class _ChunkSink:
    """Where one chunk of a ``map_async`` lands."""

    __slots__ = ("result", "index", "pid")

    def __init__(self, result: MapResult, index: int) -> None:
        self.result, self.index = result, index
        self.pid: int | None = None

    def set_running_or_notify_cancel(self) -> bool:
        return not self.result._cancelled

    def cancel(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return self.result._cancelled

    def set_result(self, value: list[Any]) -> None:
        self.result._chunk(self.index, True, value)

    def set_exception(self, exc: BaseException) -> None:
        self.result._chunk(self.index, False, exc)


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: ready once every chunk is in; then
    the list, or the first error (``error_callback`` gets it)."""

    def __init__(self, chunksize: int, length: int, callback: Any, error_callback: Any) -> None:
        super().__init__(callback, error_callback)
        self._sent = False      # its chunks are sent one by one: no single send to wait for
        self._lock = threading.Lock()
        self._value = [None] * length
        self._chunksize = chunksize
        self._number_left = 0 if chunksize <= 0 else length // chunksize + bool(length % chunksize)
        if self._number_left == 0:
            self._event.set()

    def _expect(self, n: int) -> None:
        """Only ``n`` chunks will report (the input ended early with an error)."""
        with self._lock:
            self._number_left = n

    def _chunk(self, i: int, success: bool, value: Any) -> None:
        with self._lock:
            self._number_left -= 1
            if success and self._success:
                c = self._chunksize
                self._value[i * c:(i + 1) * c] = value
            elif not success and self._success:
                self._success, self._value = False, value
            last = self._number_left == 0
        if last:
            self._finish(self._success, self._value)
