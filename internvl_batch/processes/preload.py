"""Imported by the fork server (start.py), once, before it forks vLLM engine cores and their
executor workers: the imports each of them, spawned, would otherwise repeat. A failure here
only costs that saving (the process then imports what it needs itself), so it must not stop
the server. Only the server imports this module."""
import atexit
import os

try:
    import torch  # noqa: F401
    import vllm  # noqa: F401
    import vllm.v1.engine.core  # noqa: F401
    import vllm.v1.executor.multiproc_executor  # noqa: F401 - the workers' starter
except BaseException:  # noqa: BLE001 - any error: the fork server must keep running
    pass

# The server leaves (at EOF on its `alive` pipe) through the interpreter's exit, whose
# teardown of what it imported above took 2.4-4.5 s on 2 CPU cores, and `run` waits for it
# at its end. It holds nothing to flush: registered last, this runs first and skips the rest
# (0.07-0.11 s). What the server forks leaves with os._exit and never runs it.
atexit.register(os._exit, 0)
