"""Worker pools and the parallel map.

* ``abstract.py``: ``AbstractWorkerPool``, its operations, and how a call runs on a pool;
* ``poolstate.py``: a pool's members, idle workers and waiters, kept on its owner;
* ``funccache.py``: the function cache (a function ships once per worker; the drop-ins
  use its weak form);
* ``pace.py``: how much work each worker holds, learnt from replies (``pmap`` and the
  drop-ins);
* ``workerpool.py``: ``WorkerPool``, ``CachingPool``, ``default_worker_pool``, ``remote``;
* ``pmap.py``: ``pmap``, its checks and its story; ``mapper.py``: the distributed map
  and the chunks it runs on workers; ``retries.py``: when a failed element is tried again;
* ``progress.py``: progress bars (``pmap(progress=True)``, ``progress(futures)``).

Built on worker processes, references and the cluster layer.
"""
