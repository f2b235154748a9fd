"""``python -m pydist.worker``: run this interpreter as a pydist worker (see ``bootstrap``)."""
from __future__ import annotations

if __name__ == "__main__":
    from pydist.processes.bootstrap import worker_main
    worker_main()
