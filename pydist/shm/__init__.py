"""The shared-memory transport (``shm://``): two SPSC byte rings per connection.

``segment`` creates and attaches the POSIX shared memory and semaphores, ``ring`` moves
bytes through one ring and makes its ends wait, ``transport`` is the ``Transport`` built on
them (importing it registers the ``shm`` scheme).
"""
from __future__ import annotations
