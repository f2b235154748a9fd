"""Workers' standard output and error, relayed to the master.

A local worker's stdout and stderr are two pipes to the master, where a relay thread per
pipe copies what arrives, in one of the modes ``addprocs(..., output=...)`` chooses:

* ``"prefix"`` (the default, Julia's way): each line of stdout goes to the master's
  ``sys.stdout`` as ``      From worker N:\\t<line>``, each line of stderr likewise to
  ``sys.stderr``;
* ``"raw"`` (the drop-ins, the standard library's way): the bytes as they come, stdout to
  ``sys.stdout`` and stderr to ``sys.stderr``, with no prefix;
* a callable ``output(worker_id, stream, data)``: called with ``"stdout"`` or ``"stderr"``
  and the bytes, on the relay thread.

Ordering with results: a worker counts the bytes its ``sys.stdout`` and ``sys.stderr``
write (``install_worker_streams``). After a task that printed, the drop-ins flush both and
send the counts with the result (``printed``); the master, before delivering it, waits until
its relay has passed that many bytes on (``wait_relayed``). A task that printed nothing
costs one flag test.
"""
from __future__ import annotations

import codecs
import io
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

__all__ = ["OUTPUT_MODES", "check_output", "Relay", "wait_relayed", "install_worker_streams",
           "printed"]

OUTPUT_MODES = ("prefix", "raw")
RELAY_WAIT = 5.0          # seconds a result waits at most for its task's output
_CHUNK = 65536


def check_output(output: Any) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``output`` is a mode or a callable."""
    if callable(output):
        return
    if not isinstance(output, str):
        raise TypeError(f"addprocs(output=...) takes 'prefix', 'raw' or a callable, "
                        f"not {type(output).__name__}")
    if output not in OUTPUT_MODES:
        raise ValueError(f"addprocs(output={output!r}): choose 'prefix', 'raw' or a callable "
                         f"output(worker_id, stream, data)")


# -- the master's side -----------------------------------------------------------------------------
_relays: dict[int, Relay] = {}          # worker id -> its relay, once registered
_relayed = threading.Condition()          # notified whenever a relay has passed bytes on


class Relay:
    """Copies one worker's stdout and stderr pipes to this process, and counts the bytes."""

    def __init__(self, output: Any, secret: str | None = None) -> None:
        self.output = output
        # Blanked in what is passed on: an interpreter that misread its input (the cookie)
        # as a program quotes it in its error.
        self.secret = secret.encode() if secret else None
        self.pid: int | None = None
        self.counts = [0, 0]           # bytes passed on: stdout, stderr (under _relayed)

    def start(self, out: BinaryIO, err: BinaryIO | None) -> None:
        """Start a thread per stream (each closes its stream when the worker is gone)."""
        for index, stream in enumerate((out, err)):
            if stream is not None:
                threading.Thread(target=self._pump, args=(index, stream), name="pydist-output",
                                 daemon=True).start()

    def register(self, pid: int) -> None:
        """The worker got its id: prefixes name it, and results can wait for its output."""
        self.pid = pid
        with _relayed:
            _relays[pid] = self

    def forget(self) -> None:
        with _relayed:
            if self.pid is not None and _relays.get(self.pid) is self:
                del _relays[self.pid]

    def _pump(self, index: int, stream: BinaryIO) -> None:
        write = _writer(self, index)
        try:
            while True:
                try:
                    data = _read_some(stream)
                except (OSError, ValueError):
                    return
                try:
                    # b"": the end (a last line without its newline)
                    write(data.replace(self.secret, b"<cluster cookie>") if self.secret else data)
                except Exception:     # our stream is closed or gone, the callable failed:
                    pass              # drop it, but keep draining the worker's pipe
                if not data:
                    return
                with _relayed:
                    self.counts[index] += len(data)
                    _relayed.notify_all()
        finally:
            try:
                stream.close()
            except OSError:
                pass


def _read_some(stream: BinaryIO) -> bytes:
    read1 = getattr(stream, "read1", None)
    return read1(_CHUNK) if read1 is not None else os.read(stream.fileno(), _CHUNK)


def _writer(relay: Relay, index: int) -> Callable[[bytes], None]:
    """How stream ``index`` (0 stdout, 1 stderr) of ``relay``'s worker is passed on."""
    name = ("stdout", "stderr")[index]
    if callable(relay.output):
        def call(data: bytes) -> None:
            if data:
                relay.output(relay.pid, name, data)
        return call
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if relay.output == "raw":
        return lambda data: _write_raw(getattr(sys, name), data, decoder)
    partial: list[str] = []

    def prefixed(data: bytes) -> None:
        text = "".join(partial) + decoder.decode(data, final=not data)
        lines = text.splitlines(keepends=True)
        partial[:] = [lines.pop()] if lines and not lines[-1].endswith(("\n", "\r")) else []
        if not data and partial:
            lines, partial[:] = [partial[0] + "\n"], []
        if lines:
            head = f"      From worker {relay.pid if relay.pid is not None else '?'}:\t"
            stream = getattr(sys, name)
            stream.write("".join(head + line for line in lines))
            stream.flush()
    return prefixed


def _write_raw(stream: Any, data: bytes, decoder: Any) -> None:
    """``data`` to ``stream`` as is: to its byte buffer when it has one, else decoded."""
    buffer = getattr(stream, "buffer", None)
    if isinstance(buffer, (io.BufferedIOBase, io.RawIOBase)):
        stream.flush()             # what the master printed itself goes first
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(decoder.decode(data))
        stream.flush()


def wait_relayed(pid: int, out: int, err: int, timeout: float = RELAY_WAIT) -> None:
    """Wait until worker ``pid``'s relay has passed on ``out`` bytes of stdout and ``err`` of
    stderr (at most ``timeout`` seconds; at once if the worker has no relay here)."""
    with _relayed:
        relay = _relays.get(pid)
        if relay is None:
            return
        _relayed.wait_for(lambda: relay.counts[0] >= out and relay.counts[1] >= err
                          or _relays.get(pid) is not relay, timeout)


# -- the worker's side -------------------------------------------------------------------------------
class _CountingFile(io.RawIOBase):
    """A file descriptor that counts the bytes written to it."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.count = 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        self.count += done
        return done


class _WorkerStream(io.TextIOWrapper):
    """The worker's ``sys.stdout``/``sys.stderr``: notes that something was written."""

    dirty = False
    raw_file: _CountingFile   # set right after it is made

    def write(self, s: str) -> int:
        self.dirty = True
        return super().write(s)


_streams: list[_WorkerStream] = []


def install_worker_streams() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` count what they write (on a worker, once)."""
    if _streams:
        return
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        encoding = getattr(old, "encoding", None) or "utf-8"
        errors = getattr(old, "errors", None) or "strict"
        raw = _CountingFile(fd)
        stream = _WorkerStream(io.BufferedWriter(raw), encoding=encoding, errors=errors,
                               line_buffering=True)
        stream.raw_file = raw
        try:
            old.flush()
        except (OSError, ValueError):
            pass
        setattr(sys, name, stream)
        _streams.append(stream)


def printed() -> tuple[int, int] | None:
    """After a task: ``None`` if it printed nothing, else (after flushing both streams) the
    bytes this worker's ``sys.stdout`` and ``sys.stderr`` have written so far."""
    if not _streams:
        return None
    out, err = _streams
    if not (out.dirty or err.dirty):
        return None
    out.dirty = err.dirty = False
    for s in _streams:
        try:
            s.flush()
        except (OSError, ValueError):
            pass
    return (out.raw_file.count, err.raw_file.count)
