"""Shared-memory segments and semaphores: names, modes, ownership checks, unlinking, sizes."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading

import pytest

posix_ipc = pytest.importorskip("posix_ipc")

from pydist.shm import segment as seg  # noqa: E402
from pydist.shm.segment import PREFIX, Segment, SegmentError  # noqa: E402

SHM_DIR = "/dev/shm"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs /dev/shm (Linux)")


def shm_file(name: str) -> str:
    return os.path.join(SHM_DIR, name.lstrip("/"))


def sem_file(name: str) -> str:
    return os.path.join(SHM_DIR, "sem." + name.lstrip("/"))


def exists(name: str) -> bool:
    return os.path.exists(shm_file(name)) or os.path.exists(sem_file(name))


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch):
    """Every name a test creates is gone from /dev/shm when it ends."""
    made: list[str] = []
    real = seg.new_name

    def recording() -> str:
        name = real()
        made.append(name)
        return name
    monkeypatch.setattr(seg, "new_name", recording)
    yield made
    left = [n for n in made if exists(n)]
    for name in left:  # clean up so one failure does not leak into the next test
        seg._unlink_shm(name)
        seg._unlink_sem(name)
    assert not left, f"left behind in /dev/shm: {left}"


@pytest.fixture
def segment():
    s = Segment.create(1 << 16, [0, 1])
    yield s
    s.unlink()
    s.close()


def test_names_have_prefix_and_64_random_bits():
    names = {seg.new_name() for _ in range(2000)}
    assert len(names) == 2000
    for name in names:
        assert re.fullmatch(r"/pydist-[0-9a-f]{16}", name), name
        assert seg.valid_name(name) and len(name) <= 31  # macOS limit
    assert PREFIX == "/pydist-"


def test_segment_and_semaphore_names_are_fresh_and_distinct(segment):
    names = [segment.name, *segment.sem_names]
    assert len(set(names)) == len(names) == 3
    assert all(seg.valid_name(n) for n in names)
    assert str(os.getpid()) not in "".join(names)


def test_mode_is_0600_and_owner_is_us(segment):
    for path in (shm_file(segment.name), *map(sem_file, segment.sem_names)):
        st = os.stat(path)
        assert st.st_mode & 0o777 == 0o600, (path, oct(st.st_mode))
        assert st.st_uid == os.geteuid()


def test_mode_is_0600_under_umask_000():
    code = (
        "import os, stat\n"
        "os.umask(0)\n"
        "from pydist.shm.segment import Segment\n"
        "s = Segment.create(4096, [0])\n"
        "modes = [os.stat('/dev/shm/' + s.name[1:]).st_mode, "
        "os.stat('/dev/shm/sem.' + s.sem_names[0][1:]).st_mode]\n"
        "s.unlink(); s.close()\n"
        "print(' '.join(oct(stat.S_IMODE(m)) for m in modes))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0o600", "0o600"]


MODES_OF_A_CONNECTION = (
    "import os, stat, threading\n"
    "os.umask(0)\n"
    "from pydist.shm import rendezvous\n"
    "made, modes = rendezvous.new_segment, []\n"
    "def noting(*args):\n"
    "    s = made(*args)\n"  # before the names are handed over and unlinked
    "    paths = ['/dev/shm/' + s.name[1:]] + ['/dev/shm/sem.' + n[1:] for n in s.sem_names]\n"
    "    modes.extend(oct(stat.S_IMODE(os.stat(p).st_mode)) for p in paths)\n"
    "    return s\n"
    "rendezvous.new_segment = noting\n"
    "with rendezvous.ShmListener() as listener:\n"
    "    box = []\n"
    "    th = threading.Thread(target=lambda: box.append(listener.accept()))\n"
    "    th.start()\n"
    "    dialed = rendezvous.connect_shm(listener.address, 30)\n"
    "    th.join(30)\n"
    "    dialed.close(); box[0].close()\n"
    "print(' '.join(modes))\n"
)


def test_a_connections_segment_and_all_its_semaphores_are_0600_under_umask_000():
    out = subprocess.run([sys.executable, "-c", MODES_OF_A_CONNECTION], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0o600"] * 7  # the segment and six semaphores


def squat(path: str) -> None:
    """What another process of ours could leave under a name: a plain file anyone may use."""
    with open(path, "x") as f:
        f.write("squatter")
    os.chmod(path, 0o666)


def untouched(path: str) -> bool:
    with open(path) as f:
        return f.read() == "squatter" and os.stat(path).st_mode & 0o777 == 0o666


def test_a_squatted_semaphore_name_is_passed_over(monkeypatch, no_leftovers):
    taken = seg.new_name()
    squat(sem_file(taken))
    names = iter([seg.new_name(), taken])  # the segment's name, then the squatted one
    real = seg.new_name
    monkeypatch.setattr(seg, "new_name", lambda: next(names, None) or real())
    try:
        s = Segment.create(4096, [0, 0])
        try:
            assert taken not in s.sem_names and len(set(s.sem_names)) == 2
            assert untouched(sem_file(taken))
        finally:
            s.unlink()
            s.close()
    finally:
        os.remove(sem_file(taken))


def test_a_plans_names_are_used_and_a_replacement_is_announced_before_it_exists():
    taken = seg.new_name()
    squat(sem_file(taken))
    heard = []

    def on_replace(old: str, fresh: str) -> None:
        heard.append((old, fresh, exists(fresh)))
    plan = seg.NamePlan(2, on_replace)
    plan.sems[1] = taken
    planned = [plan.shm, plan.sems[0]]
    try:
        s = Segment.create(4096, [0, 0], plan)
        try:
            assert [s.name, s.sem_names[0]] == planned  # created under the planned names
            assert heard == [(taken, s.sem_names[1], False)]  # told first, created after
            assert plan.names == [s.name, *s.sem_names] and untouched(sem_file(taken))
        finally:
            s.unlink()
            s.close()
    finally:
        os.remove(sem_file(taken))


def test_every_name_squatted_is_an_error_and_leaves_the_squatter_alone(monkeypatch):
    taken = seg.new_name()
    for path in (shm_file(taken), sem_file(taken)):
        squat(path)
    monkeypatch.setattr(seg, "new_name", lambda: taken)
    try:
        with pytest.raises(SegmentError, match="fresh name"):
            Segment.create(4096, [0])
        assert untouched(shm_file(taken)) and untouched(sem_file(taken))
        os.remove(shm_file(taken))  # a free segment name now; every semaphore name squatted
        with pytest.raises(SegmentError, match="fresh name"):
            Segment.create(4096, [0])
        assert not os.path.exists(shm_file(taken))  # the half-made segment was removed
        assert untouched(sem_file(taken))
    finally:
        for path in (shm_file(taken), sem_file(taken)):
            if os.path.exists(path):
                os.remove(path)


def test_attach_sees_the_same_memory_and_semaphores(segment):
    other = Segment.attach(segment.name, segment.sem_names, segment.size)
    try:
        segment.buf[100:105] = b"hello"
        assert other.buf[100:105] == b"hello"
        segment.sems[0].release()
        other.sems[0].acquire(1.0)  # would raise BusyError if not the same semaphore
    finally:
        other.close()


def test_names_unlinked_once_both_attached_and_memory_stays_usable(segment):
    other = Segment.attach(segment.name, segment.sem_names, segment.size)
    try:
        segment.unlink()
        other.unlink()  # both ends do it; the second is a no-op
        assert not any(exists(n) for n in (segment.name, *segment.sem_names))
        other.buf[0:3] = b"abc"
        assert segment.buf[0:3] == b"abc"
        other.sems[1].acquire(1.0)  # initial value 1, through an unlinked name
    finally:
        other.close()


@pytest.mark.parametrize("which", ["segment", "semaphore"])
def test_attach_refuses_group_or_other_access(segment, which):
    path = shm_file(segment.name) if which == "segment" else sem_file(segment.sem_names[1])
    os.chmod(path, 0o644)
    with pytest.raises(SegmentError, match="0644"):
        Segment.attach(segment.name, segment.sem_names, segment.size)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
@pytest.mark.parametrize("which", ["segment", "semaphore"])
def test_attach_refuses_another_owner(segment, which):
    path = shm_file(segment.name) if which == "segment" else sem_file(segment.sem_names[0])
    os.chown(path, 65534, -1)
    with pytest.raises(SegmentError, match="owned by uid 65534"):
        Segment.attach(segment.name, segment.sem_names, segment.size)


def test_attach_refuses_foreign_names_and_missing_objects(segment):
    with pytest.raises(SegmentError, match="not a pydist object name"):
        Segment.attach("/psm_1234", segment.sem_names, segment.size)
    with pytest.raises(SegmentError, match="not a pydist object name"):
        Segment.attach(segment.name, ["/../../etc/passwd"], segment.size)
    with pytest.raises(SegmentError, match="gone"):
        Segment.attach(PREFIX + "0" * 16, segment.sem_names, segment.size)
    with pytest.raises(SegmentError, match="promised"):
        Segment.attach(segment.name, segment.sem_names, segment.size * 2)


def test_too_large_for_dev_shm_is_oserror_at_creation(no_leftovers):
    st = os.statvfs(SHM_DIR)
    # More than the whole tmpfs: the kernel refuses at once instead of filling memory first.
    size = st.f_blocks * st.f_frsize + (1 << 30)
    with pytest.raises(OSError) as info:
        Segment.create(size, [0])
    assert info.value.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM)
    assert no_leftovers  # a name was tried, and the fixture checks it is gone


def test_fallocate_failure_leaves_nothing(monkeypatch, no_leftovers):
    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="is /dev/shm full"):
        Segment.create(1 << 20, [0, 0])
    assert no_leftovers


def test_semaphore_failure_leaves_nothing(monkeypatch, no_leftovers):
    calls = []
    real = seg._create_sem

    def failing(plan, index: int, initial: int):
        if calls:
            raise OSError(errno.EMFILE, "Too many open files")
        calls.append(1)
        return real(plan, index, initial)
    monkeypatch.setattr(seg, "_create_sem", failing)
    with pytest.raises(OSError, match="Too many"):
        Segment.create(4096, [0, 0, 0])
    # Every name is picked first; the segment and one semaphore were made, and removed.
    assert len(no_leftovers) == 4 and calls == [1]


def test_without_posix_fallocate_falls_back_to_ftruncate(monkeypatch):
    monkeypatch.delattr(os, "posix_fallocate")
    s = Segment.create(1 << 16, [0])
    try:
        assert os.stat(shm_file(s.name)).st_size == 1 << 16
        s.buf[-1] = 7
    finally:
        s.unlink()
        s.close()


def test_close_and_unlink_are_idempotent():
    s = Segment.create(4096, [0])
    s.unlink()
    s.unlink()
    s.close()
    s.close()
    assert s.buf.closed


def test_create_retries_on_a_name_collision(monkeypatch, no_leftovers):
    squatter = Segment.create(4096, [])
    names = iter([squatter.name, seg.new_name()])
    monkeypatch.setattr(seg, "new_name", lambda: next(names))
    try:
        s = Segment.create(4096, [])
        assert s.name != squatter.name
        s.unlink()
        s.close()
    finally:
        squatter.unlink()
        squatter.close()


def test_concurrent_creation_never_collides():
    made: list[Segment] = []
    lock = threading.Lock()

    def make() -> None:
        for _ in range(20):
            s = Segment.create(4096, [0])
            with lock:
                made.append(s)
    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len({s.name for s in made}) == len(made) == 80
    finally:
        for s in made:
            s.unlink()
            s.close()
