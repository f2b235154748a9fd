"""The cluster: one process's view of the process group, and how its connections are served.

* ``group.py``: ``ProcessGroup`` (``PGRP``), the one owner of pid -> worker, the references
  and the reply waiters; ``myid``, ``workers``, ``procs``;
* ``values.py``: the cells that hold a value on its owner (``RemoteValue``, ``Failure``);
* ``inbox.py``: who reads a connection (a waiting thread, or a background reader);
* ``runner.py``: where incoming calls run (a worker's main thread, spare threads);
* ``dispatch.py``: one handler per message kind, and the internal operations;
* ``join.py``: the hello, the join handshake, connections between workers;
* ``lease.py``: heartbeat leases of remote workers;
* ``output.py``: workers' stdout and stderr relayed to the master.

Built on transports (through the ``Transport`` protocol), the wire format and the errors.
"""
