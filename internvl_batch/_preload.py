"""Imported by procstart's fork server, once, before it forks vLLM engine cores and their
executor workers: the imports each of them, spawned, would otherwise repeat. A failure here
only costs that saving (the process then imports what it needs itself), so it must not stop
the server."""
try:
    import torch  # noqa: F401
    import vllm  # noqa: F401
    import vllm.v1.engine.core  # noqa: F401
    import vllm.v1.executor.multiproc_executor  # noqa: F401 - the workers' starter
except BaseException:  # noqa: BLE001 - any error: the fork server must keep running
    pass
