"""Shared arrays (Julia's ``SharedArrays``).

* ``sharedarray.py``: ``SharedArray``, a numpy array in shared memory mapped by local
  processes, and its helpers (``sdata``, ``localindices``, ``indexpids``, ...);
* ``sharedmap.py``: each process's table of mappings, and when a mapping may be forgotten.

Built on references, the cluster layer and ``shm/segment.py``.
"""
