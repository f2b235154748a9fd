"""The ``shm://`` transport: frames through two shared-memory rings, one per direction.

Importing this module registers the ``shm`` scheme. The pieces:

* ``segment.py``: the POSIX shared memory and semaphores of one connection, created safely;
* ``layout.py``: where the two rings live in the segment;
* ``ring.py``: one single-producer/single-consumer byte ring;
* ``fence.py``: why its accesses are ordered on every machine;
* ``wait.py``: how an end waits (a spin where it pays, then a timed sleep);
* ``placement.py``: on which vCPUs the two ends run, which decides whether a spin pays;
* ``buffers.py``: the memory a received frame lands in (large buffers are reused);
* ``bigbuf.py`` and ``bigin.py``: large frames in pooled segments the receiver maps;
* ``copier.py``: large copies and page mappings split across a few threads;
* ``connection.py``: ``ShmTransport``, frames over the two rings, closing, the lifeline;
* ``rendezvous.py``: ``ShmListener``, ``connect_shm`` and ``shm_pair``;
* ``handover.py``: the rendezvous lines, and which end unlinks the names when.
"""
from __future__ import annotations

from .. import transport
from .connection import ShmTransport
from .layout import DEFAULT_CAPACITY, MAX_CAPACITY
from .rendezvous import RENDEZVOUS_TIMEOUT, ShmListener, connect_shm, shm_pair

__all__ = ["ShmTransport", "ShmListener", "connect_shm", "shm_pair", "DEFAULT_CAPACITY",
           "MAX_CAPACITY", "RENDEZVOUS_TIMEOUT"]

transport.register_scheme("shm", connect_shm, ShmListener)
