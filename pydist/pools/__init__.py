"""Worker pools and the parallel map.

* ``abstract.py``: ``AbstractWorkerPool``, its operations, and how a call runs on a pool;
* ``poolstate.py``: a pool's members, idle workers and waiters, kept on its owner;
* ``funccache.py``: the function cache (a function ships once per worker; the drop-ins
  use its weak form);
* ``scheduler.py``: the scheduling ``pmap`` and the drop-ins share: a held worker's books
  (``Slot``), the pace learnt from replies and the windows it sizes, recycling, handing
  workers over to the pool's other users, retrying a failed message apart;
  ``stealing.py``: calls queued behind a long one taken back for an idle worker (the
  gate on the worker, and the scheduler's side; the drop-ins use it);
* ``workerpool.py``: ``WorkerPool``, ``CachingPool``, ``default_worker_pool``, ``remote``;
* ``pmap.py``: ``pmap``, its checks and its story; ``mapper.py``: the distributed map
  and the chunks it runs on workers; ``retries.py``: when a failed element is tried again;
* ``progress.py``: progress bars (``pmap(progress=True)``, ``progress(futures)``).

Built on worker processes, references and the cluster layer.
"""
