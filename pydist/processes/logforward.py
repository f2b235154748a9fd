"""``forward_logging``: the ``logging`` records of workers, handled by the master's loggers.

Opt-in (as dask's ``Client.forward_logging``). Once called on the master, every worker --
those running now and those added later, the drop-ins' too -- gets a handler on the named
logger (the root logger by default) that sends each record it handles to process 1, where
it is handled by the logger of the same name with ``record.worker`` set to the worker's id.
The message is formatted on the worker (``record.args`` are not sent) and an exception's
traceback travels as text (``record.exc_text``), so every record can be pickled.
"""
from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Iterable
from typing import Any

from ..cluster.group import PGRP
from ..cluster.membership import workers
from ..refs.remotecall import remote_do, remotecall_wait
from .lifecycle import on_workers_added

__all__ = ["forward_logging"]

_settings: list[tuple[str | None, int]] = []    # the master's choice, once made
_lock = threading.Lock()


def forward_logging(logger_name: str | None = None, level: int = logging.NOTSET, *,
                    enable: bool = True) -> None:
    """Forward the workers' ``logging`` records of ``logger_name`` (``None``: all of them)
    at ``level`` and above to this process's loggers; ``enable=False`` stops forwarding.

    ``level`` also becomes the level of that logger on the workers (when not ``NOTSET``),
    so that their ``info`` records are made at all. Only process 1 may call it.
    """
    if PGRP.myid != 1:
        raise RuntimeError(f"only process 1 (the master) may forward logging; this is process {PGRP.myid}")
    if logger_name is not None and not isinstance(logger_name, str):
        raise TypeError(f"forward_logging: logger_name must be a str or None, not {type(logger_name).__name__}")
    if not isinstance(level, int) or isinstance(level, bool):
        raise TypeError(f"forward_logging: level must be an int such as logging.INFO, not {level!r}")
    with _lock:
        _settings[:] = [(logger_name, level)] if enable else []
    if _on_added not in on_workers_added:
        on_workers_added.append(_on_added)
    _apply(workers(), logger_name, level, enable)


def _on_added(pids: list[int]) -> None:
    with _lock:
        settings = list(_settings)
    for name, level in settings:
        _apply(pids, name, level, True)


def _apply(pids: Iterable[int], name: str | None, level: int, enable: bool) -> None:
    for pid in pids:
        if pid != 1:
            remotecall_wait(_install, pid, name, level, enable)


class _Forwarder(logging.Handler):
    """On a worker: sends each record it handles to process 1."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            attrs = dict(record.__dict__)
            attrs["msg"], attrs["args"] = record.getMessage(), None
            if record.exc_info:
                attrs["exc_text"] = record.exc_text or "".join(
                    traceback.format_exception(*record.exc_info)).rstrip("\n")
            attrs["exc_info"] = None
            remote_do(_receive, 1, PGRP.myid, attrs)
        except Exception:
            self.handleError(record)


def _install(name: str | None, level: int, enable: bool) -> None:
    """On a worker: put a forwarder on logger ``name`` (or take it off)."""
    logger = logging.getLogger(name)
    for h in [h for h in logger.handlers if isinstance(h, _Forwarder)]:
        logger.removeHandler(h)
    if enable:
        logger.addHandler(_Forwarder(level))
        if level != logging.NOTSET:
            logger.setLevel(level)


def _receive(pid: int, attrs: dict[str, Any]) -> None:
    """On the master: handle a worker's record as if it were made here, with its worker id."""
    record = logging.makeLogRecord(attrs)
    record.worker = pid
    logger = logging.getLogger(record.name if record.name != "root" else None)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)
