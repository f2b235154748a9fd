"""The exceptions pydist raises: the vocabulary of failure, shared by every layer.

Only the standard library is imported here (layer L0).
"""
from __future__ import annotations

import concurrent.futures
import pickle
import signal
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PydistError", "RemoteException", "CapturedException", "ProcessExitedException",
    "InvalidStateException", "TransportError", "TransportClosed", "TransportBroken",
    "DecodeError", "BodyDecodeError", "AuthenticationError", "SerializationError",
    "LaunchError", "RemoteErrorStandIn", "set_exception_pickler", "qualified_name",
]


class PydistError(Exception):
    """Base class of pydist's own errors (not of errors raised by user code)."""


class TransportError(PydistError, OSError):
    """A transport could not move a frame."""


class TransportClosed(TransportError):
    """The connection ended cleanly: the peer (or this side) closed it."""


class TransportBroken(TransportError):
    """The connection ended abnormally: the peer died, the link reset, the data was corrupt."""


class DecodeError(PydistError, ValueError):
    """Bytes received do not form a valid frame or message (a bad length, magic or tag)."""


class BodyDecodeError(DecodeError):
    """The message header was valid but its body could not be unpickled.

    ``header`` and ``kind`` are those of the message, so the receiver can still answer the
    caller that is waiting for it; ``__cause__`` is the unpickling error.
    """

    def __init__(self, message: str, header: object, kind: type) -> None:
        super().__init__(message)
        self.header = header
        self.kind = kind


class AuthenticationError(PydistError, ConnectionError):
    """The peer did not prove knowledge of the cluster cookie (or spoke another protocol)."""


class SerializationError(PydistError, TypeError):
    """An object could not be pickled for sending (the cause names the object)."""


class LaunchError(PydistError, RuntimeError):
    """A cluster manager failed to start or connect a worker."""


class InvalidStateException(PydistError, concurrent.futures.InvalidStateError):
    """An operation is not valid in the object's state: a second ``put`` on a Future,
    ``put`` on a closed channel, ``take`` or ``fetch`` on a closed, empty channel."""


class ProcessExitedException(PydistError, BrokenProcessPool):
    """A worker this operation depends on has exited or was removed.

    Raised to every waiter of work or references held by the worker, and by every later
    call to it. Subclasses ``concurrent.futures.process.BrokenProcessPool``.
    """

    def __init__(self, worker_id: int, detail: str = "") -> None:
        self.worker_id = worker_id
        self.detail = detail
        text = f"worker {worker_id} has exited"
        if detail:
            text = f"worker {worker_id} {detail}"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker_id, self.detail))


class RemoteErrorStandIn(Exception):
    """Stands in for a remote exception whose class cannot be unpickled here."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message))


def _plain_pickle(ex: BaseException) -> bytes:
    return pickle.dumps(ex, protocol=5)


# How a captured exception becomes bytes of its own; ``serialize`` installs its pickler
# (which handles classes of ``__main__`` too) through ``set_exception_pickler``.
_exception_pickler: Callable[[BaseException], bytes] = _plain_pickle


def set_exception_pickler(fn: Callable[[BaseException], bytes]) -> None:
    """Use ``fn`` to pickle the exception inside a ``CapturedException``."""
    global _exception_pickler
    _exception_pickler = fn


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class (the bare name for builtins)."""
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in (None, "builtins") else f"{module}.{name}"


@dataclass
class CapturedException:
    """An exception caught in user code on some process: the exception and its traceback.

    The exception travels as a pickle of its own beside its type name and message, so a
    process that cannot import its type still gets a ``RemoteErrorStandIn`` naming it, the
    message and the traceback (and the rest of the message it came in).
    """

    ex: BaseException
    traceback: str

    def __str__(self) -> str:
        return self.traceback or f"{type(self.ex).__name__}: {self.ex}"

    def __reduce__(self) -> tuple[Any, ...]:
        ex = self.ex
        try:
            blob: bytes | None = _exception_pickler(ex)
        except Exception:   # an unpicklable exception still arrives, as a stand-in
            blob = None
        try:
            message = str(ex)
        except Exception:
            message = f"<{type(ex).__name__} whose str() failed>"
        return (_rebuild_captured, (blob, qualified_name(type(ex)), message, self.traceback))


def _rebuild_captured(blob: bytes | None, type_name: str, message: str,
                      traceback: str) -> CapturedException:
    ex: BaseException | None = None
    if blob is not None:
        try:
            ex = pickle.loads(blob)
        except Exception:   # its type cannot be imported here (or rebuilt): a stand-in
            ex = None
    if not isinstance(ex, BaseException):
        ex = RemoteErrorStandIn(type_name, message)
    return CapturedException(ex, traceback)


class RemoteException(PydistError):
    """An exception raised by user code run on process ``pid``.

    ``captured.ex`` is the original exception (or a ``RemoteErrorStandIn``), and
    ``captured.traceback`` the remote traceback as text; the exception is also chained as
    ``__cause__``. Passing through further processes never wraps it again.
    """

    def __init__(self, pid: int, captured: CapturedException) -> None:
        super().__init__(pid, captured)
        self.pid = pid
        self.captured = captured
        self.__cause__ = captured.ex

    def __str__(self) -> str:
        ex = self.captured.ex
        if isinstance(ex, RemoteErrorStandIn):
            head = f"on worker {self.pid}: {ex}"
        else:
            head = f"on worker {self.pid}: {type(ex).__name__}: {ex}"
        if self.captured.traceback:
            return f"{head}\n\nRemote traceback (worker {self.pid}):\n{self.captured.traceback.rstrip()}"
        return head

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.pid, self.captured))


def describe_exit(returncode: int | None) -> str:
    """Say in words how a process ended, from a Popen-style return code."""
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = "; the OS may have killed it for memory" if returncode == -signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {returncode}"
