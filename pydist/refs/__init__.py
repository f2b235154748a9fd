"""References and calls: Julia's ``Future``, ``RemoteChannel``, ``Channel`` and ``remotecall``.

* ``remoteref.py``: ``Future`` and distributed reference counting;
* ``remotechannel.py``: ``RemoteChannel`` and the owner-side operations on its channel;
* ``stdfuture.py``: a ``Future`` as ``concurrent.futures`` and asyncio see it;
* ``channel.py``: the local ``Channel`` and the timers of its waits;
* ``remotecall.py``: ``remotecall``, ``remotecall_fetch``, ``remotecall_wait``, ``remote_do``;
* ``macros.py``: Julia's macros as functions (``spawnat``, ``everywhere``, ``distributed`` ...);
* ``generic.py``: the generic verbs ``fetch``, ``put``, ``take``, ``isready``, ``wait``, ``close``.

Built on the cluster layer.
"""
