"""Worker processes: adding and removing them, and what runs inside one.

* ``lifecycle.py``: ``addprocs``, ``rmprocs``, ``interrupt``, the cluster cookie;
* ``bootstrap.py``: a worker's start (``init_worker``, ``start_worker``, ``pydist-worker``);
* ``forkserver.py``: the worker server that forks local workers (its client is
  ``managers/forkclient.py``);
* ``elastic.py``: ``ElasticManager``, which joins the workers that dial in by calling
  ``addprocs`` itself;
* ``logforward.py``: workers' ``logging`` records handled by the master.

Built on the cluster managers, references and the cluster layer.
"""
