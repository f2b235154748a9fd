"""What crosses a connection, as bytes: the vocabulary and its encoding (no sockets, threads or clocks).

* ``messages.py``: the message kinds (Julia's ``messages.jl``), one tag table, headers;
* ``serialize.py``: the pickle policy (protocol 5, out-of-band buffers, cloudpickle for
  ``__main__``);
* ``codec.py``: frames, message encoding, and the authenticated hello (sans-IO).

Built on ``errors.py`` only; everything above a transport uses it.
"""
