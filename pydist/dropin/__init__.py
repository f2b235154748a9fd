"""The standard-library drop-ins: ``executor.py`` (``Executor``, ``ProcessPoolExecutor``) and
``pool.py`` (``Pool``), and the machinery only they need. One idea a module:

* ``worker_side.py``: what runs on the workers (batches, through the pools' gate that
  lets a batch be taken back; the initializer) and what travels to them and back;
* ``records.py``: the master's books: tasks, batches, workers; workers as processes;
* ``futures.py``: how a task's outcome reaches the caller (futures, pumping, errors);
* ``core.py``: ``_Core``, one executor: its settings, the shared state objects of
  ``state.py`` (lifecycle flags, task queue) and its parts, each the owner
  of its own state: ``dispatching.py`` (tasks out, replies in), ``staffing.py`` (the
  worker records; workers started, lost, retired), ``stealing.py`` (when to take back
  tasks from behind a long one), ``closing.py`` (shutdown, breaking, interpreter exit),
  ``borrowing.py`` (the workers of a given pool, taken and put back through the pool's
  protocol). The worker set is a pool; functions ship through the pools' function cache
  (``funccache.py``); the scheduling (windows, recycling, handing workers back) is the
  pools' (``scheduler.py``), shared with ``pmap``, and so is stealing (``stealing.py``):
  what stays here is the standard library's interface, the batches, the worker processes
  and the initializer;
* ``mapfeed.py``: ``Executor.map``'s lazily read input;
* ``results.py``, ``imap.py``: what ``Pool``'s calls return;
* ``mpshare.py``: multiprocessing's locks, values and queues handed to local workers;
* ``nested.py``: a drop-in made inside a task (the standard library's class).
"""
