"""POSIX shared memory and named semaphores for one connection, created safely.

A ``Segment`` is one shared-memory object mapped into this process plus a few named
semaphores. The dialing side picks the names first (a ``NamePlan``) and announces them to
the peer before anything exists, then calls ``Segment.create``; the peer calls
``Segment.attach`` and both ``unlink`` the names (``handover.py`` says who answers for them
until then). From then on the objects live only as long as somebody has them mapped or
open, so a ``kill -9`` of every process leaves nothing behind in ``/dev/shm``.

Names are ``/pydist-`` plus 64 random bits from ``secrets`` (16 hex digits, 24 characters:
short enough for macOS's 31-character limit). They are never derived from a pid or a
cookie, and never posix_ipc's own random names (those repeat across processes started in
the same second). Objects are created exclusively (``O_CREX``) with mode 0600; the attaching
side refuses an object that is not owned by its own uid or that grants group/other access.

The size is reserved with ``posix_fallocate``: a full ``/dev/shm`` is an ``OSError`` here,
at creation, instead of a SIGBUS on first touch in the middle of a transfer.
"""
from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Sequence

import posix_ipc

__all__ = ["PREFIX", "NamePlan", "Segment", "SegmentError", "SegmentGone", "new_name", "unlink_names",
           "valid_name"]

PREFIX = "/pydist-"
_NAME_RE = re.compile(r"/pydist-[0-9a-f]{16,64}\Z")
# Where Linux keeps named semaphores (as files "sem.<name without slash>").
_SEM_DIR = "/dev/shm"
_CREATE_ATTEMPTS = 8


class SegmentError(OSError):
    """A shared-memory object or semaphore is missing, unsafe, or not what was promised."""


class SegmentGone(SegmentError):
    """The shared-memory object named is not there (never was, or its name was removed)."""


def new_name() -> str:
    """A fresh object name: the fixed prefix and 64 random bits."""
    return PREFIX + secrets.token_hex(8)


def valid_name(name: str) -> bool:
    """True if ``name`` has the form that ``new_name`` produces (checked before attaching)."""
    return isinstance(name, str) and _NAME_RE.match(name) is not None


class NamePlan:
    """The names of one segment and its semaphores, picked before any object is created.

    ``shm`` names the segment, ``sems`` the semaphores in creation order. A name found taken
    at creation (64 random bits collided, or something squats on it) is replaced by a fresh
    one; ``on_replace(taken, fresh)`` hears of it first, so a peer that was told the old
    names can follow before the fresh one exists.
    """

    def __init__(self, sem_count: int,
                 on_replace: Callable[[str, str], None] | None = None) -> None:
        self.shm = new_name()
        self.sems = [new_name() for _ in range(sem_count)]
        self._on_replace = on_replace

    @property
    def names(self) -> list[str]:
        """Every name, the segment's first."""
        return [self.shm, *self.sems]

    def replace(self, index: int) -> str:
        """Give ``names[index]`` a fresh name (announced first) and return it."""
        fresh = new_name()
        if self._on_replace is not None:
            self._on_replace(self.names[index], fresh)
        if index == 0:
            self.shm = fresh
        else:
            self.sems[index - 1] = fresh
        return fresh


def unlink_names(shm_name: str, sem_names: Iterable[str]) -> None:
    """Remove a segment's name and its semaphores' names.

    Only names of pydist's own form are touched (ValueError otherwise, before any unlink).
    A name already gone is passed over, and so is one we may not remove (another user's
    object: /dev/shm is sticky).
    """
    sem_names = list(sem_names)
    for name in (shm_name, *sem_names):
        if not valid_name(name):
            raise ValueError(f"refusing to unlink {name!r}: not a pydist object name")
    for unlink, name in ((_unlink_shm, shm_name), *((_unlink_sem, n) for n in sem_names)):
        try:
            unlink(name)
        except posix_ipc.PermissionsError:
            pass


def _reserve(fd: int, size: int) -> None:
    """Give the object ``size`` bytes backed by real pages, or raise OSError (e.g. ENOSPC)."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # macOS: no fallocate; ftruncate is the best there is.
        os.ftruncate(fd, size)
        return
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            os.ftruncate(fd, size)
            return
        raise OSError(exc.errno, f"cannot reserve {size} bytes of shared memory "
                                 f"(is /dev/shm full or too small?): {exc.strerror}") from exc


def _check_owner(st: os.stat_result, what: str) -> None:
    """Refuse an object that someone else owns or that others may open."""
    if st.st_uid != os.geteuid():
        raise SegmentError(f"{what} is owned by uid {st.st_uid}, not by us ({os.geteuid()}); "
                           "refusing to attach")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise SegmentError(f"{what} has mode {stat.S_IMODE(st.st_mode):04o}; it must grant no "
                           "group or other access (0600); refusing to attach")


def _sem_path(name: str) -> str:
    return os.path.join(_SEM_DIR, "sem." + name.lstrip("/"))


def _check_sem_file(name: str) -> None:
    """Check owner and mode of a named semaphore where the OS shows it as a file (Linux)."""
    try:
        st = os.stat(_sem_path(name))
    except FileNotFoundError:
        # Not a file on this OS, or the name is already gone (posix_ipc will say so).
        return
    _check_owner(st, f"semaphore {name}")


def _create_sem(plan: NamePlan, index: int, initial: int) -> posix_ipc.Semaphore:
    """Semaphore ``index`` of ``plan``, created exclusively under its planned name."""
    name = plan.sems[index]
    for attempt in range(_CREATE_ATTEMPTS):
        if attempt:
            # 64 random bits collided (or someone squats the name): pick another
            name = plan.replace(1 + index)
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, initial)
        except posix_ipc.ExistentialError:
            continue
        try:
            os.chmod(_sem_path(sem.name), 0o600)  # a strange umask may have removed bits
        except FileNotFoundError:
            pass  # not a file on this OS
        return sem
    raise SegmentError("could not create a semaphore with a fresh name")


def _create_shm(plan: NamePlan, size: int) -> posix_ipc.SharedMemory:
    """The segment of ``plan``, created exclusively under its planned name."""
    name = plan.shm
    for attempt in range(_CREATE_ATTEMPTS):
        if attempt:
            name = plan.replace(0)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, 0o600, 0)
        except posix_ipc.ExistentialError:
            continue
        try:
            os.fchmod(shm.fd, 0o600)  # the mode must not depend on the umask
            _reserve(shm.fd, size)
        except BaseException:
            shm.close_fd()
            _unlink_shm(shm.name)
            raise
        return shm
    raise SegmentError("could not create a shared-memory object with a fresh name")


def _map(fd: int, size: int) -> mmap.mmap:
    # No MAP_POPULATE: the pages exist already (reserved by the creator), and mapping them
    # all at once would cost each end ~3.5 ms of every connection (8 MiB) on the way to the
    # first call. A page is mapped at its first touch instead (a minor fault), which spreads
    # over the first pass through the ring and stays under 3 ms even for a large first frame.
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _unlink_shm(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def _unlink_sem(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass


class Segment:
    """A mapped shared-memory object of ``size`` bytes plus named semaphores.

    ``buf`` is the mapping; ``sems`` the semaphores in creation order. Make one with
    ``Segment.create`` or ``Segment.attach``; ``unlink()`` removes the names (idempotent),
    ``close()`` unmaps and closes the handles (idempotent; call it only when no thread
    still uses ``buf`` or ``sems``).
    """

    def __init__(self, shm_name: str, sems: list[posix_ipc.Semaphore], buf: mmap.mmap,
                 size: int) -> None:
        self.name = shm_name
        self.sems = sems
        self.buf = buf
        self.size = size
        self._unlinked = False
        self._closed = False

    @property
    def sem_names(self) -> list[str]:
        return [s.name for s in self.sems]

    @classmethod
    def create(cls, size: int, initial_values: Sequence[int],
               names: NamePlan | None = None) -> Segment:
        """Create a fresh object of ``size`` bytes and one semaphore per initial value,
        under the names of ``names`` (fresh ones if None)."""
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        plan = NamePlan(len(initial_values)) if names is None else names
        if len(plan.sems) != len(initial_values):
            raise ValueError(f"{len(plan.sems)} semaphore names for {len(initial_values)} "
                             "semaphores")
        shm = _create_shm(plan, size)
        sems: list[posix_ipc.Semaphore] = []
        try:
            buf = _map(shm.fd, size)
            for index, value in enumerate(initial_values):
                sems.append(_create_sem(plan, index, value))
        except BaseException:
            _discard(shm.name, sems)
            raise
        finally:
            shm.close_fd()
        return cls(shm.name, sems, buf, size)

    @classmethod
    def attach(cls, shm_name: str, sem_names: Sequence[str], size: int, *,
               opened: Callable[[], None] | None = None) -> Segment:
        """Open objects another process of our own uid created; check before mapping.

        ``opened`` is called once every object is open and checked, before the mapping
        (which pre-faults every page, the slow part): the moment the names may go.
        """
        for name in (shm_name, *sem_names):
            if not valid_name(name):
                raise SegmentError(f"refusing to attach to {name!r}: not a pydist object name")
        try:
            shm = posix_ipc.SharedMemory(shm_name, 0)
        except posix_ipc.ExistentialError as exc:
            raise SegmentGone(f"shared-memory object {shm_name} is gone: {exc}") from None
        sems: list[posix_ipc.Semaphore] = []
        try:
            st = os.fstat(shm.fd)
            _check_owner(st, f"shared-memory object {shm_name}")
            if st.st_size < size:
                raise SegmentError(f"shared-memory object {shm_name} has {st.st_size} bytes, "
                                   f"{size} were promised")
            for name in sem_names:
                sems.append(_open_sem(name))
            if opened is not None:
                opened()
            buf = _map(shm.fd, size)  # an unlinked object's descriptor still maps it
        except BaseException:
            for sem in sems:
                sem.close()
            raise
        finally:
            shm.close_fd()
        return cls(shm_name, sems, buf, size)

    def unlink(self) -> None:
        """Remove the names; the mapping and semaphore handles stay usable."""
        if self._unlinked:
            return
        self._unlinked = True
        unlink_names(self.name, self.sem_names)

    def close(self) -> None:
        """Unmap and close every handle. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.buf.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes when it does
        for sem in self.sems:
            try:
                sem.close()
            except posix_ipc.Error:
                pass

    def __repr__(self) -> str:
        return f"<Segment {self.name} {self.size} bytes, {len(self.sems)} semaphores>"


def _open_sem(name: str) -> posix_ipc.Semaphore:
    # Check before and after opening: between the two checks the name cannot change hands,
    # because /dev/shm is sticky and only we (the owner) may unlink our own file.
    _check_sem_file(name)
    try:
        sem = posix_ipc.Semaphore(name, 0)
    except posix_ipc.ExistentialError as exc:
        raise SegmentError(f"semaphore {name} is gone: {exc}") from None
    try:
        _check_sem_file(name)
    except BaseException:
        sem.close()
        raise
    return sem


def _discard(shm_name: str, sems: list[posix_ipc.Semaphore]) -> None:
    """Undo a half-finished ``create``."""
    _unlink_shm(shm_name)
    for sem in sems:
        _unlink_sem(sem.name)
        sem.close()
