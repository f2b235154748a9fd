"""The cluster: one process's view of the process group, and how its connections are served.

* ``group.py``: ``ProcessGroup`` (``PGRP``), the one owner of pid -> worker, the references
  and the reply waiters; the cluster cookie;
* ``peers.py``: this process's record of another (``Worker``, ``WorkerState``), what a
  manager says of it (``WorkerConfig``) and what the cluster asks of a manager;
* ``membership.py``: ``myid``, ``workers``, ``procs``, ``nprocs``, ``nworkers``,
  ``worker_state``;
* ``values.py``: the cells that hold a value on its owner (``RemoteValue``, ``Failure``);
* ``inbox.py``: who reads a connection (a waiting thread, or a background reader);
* ``runner.py``: where incoming calls run (a worker's main thread, spare threads);
* ``dispatch.py``: one handler per message kind, and the internal operations;
* ``waiting.py``: how a thread waits for an answer (``wait_value``, ``call_on_owner``);
* ``destinations.py``: objects that may travel only to some processes, checked on the sender;
* ``join.py``: the hello, the join handshake, connections between workers;
* ``stopping.py``: asking a worker to exit or to interrupt its call; a worker's exit;
* ``lease.py``: heartbeat leases of remote workers;
* ``output.py``: workers' stdout and stderr relayed to the master.

Built on transports (through the ``Transport`` protocol), the wire format and the errors.
What the layers above must tell it, they tell through hooks it owns (``PGRP.on_worker_lost``,
``PGRP.connect_peer``, a worker's ``Manager``).
"""
