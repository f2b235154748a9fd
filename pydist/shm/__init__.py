"""The shared-memory transport (``shm://``): two SPSC byte rings per connection.

``transport`` is the entry point (importing it registers the ``shm`` scheme); it lists the
modules it is built from.
"""
from __future__ import annotations
