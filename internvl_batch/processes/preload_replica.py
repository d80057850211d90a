"""Imported by the fork server after `preload` when it forks `run`'s engine replicas: what
each replica process imported itself before its engine started (on an H200 with four
starting at once, 13-16 s from the process's start to `Engine.start`, then 8.2-8.7 s for
`from vllm import LLM`; docs/performance.md). As in `preload`, a failure only costs the
saving, and the server's exit skips the teardown of these imports too."""
import atexit
import os

try:
    import transformers  # noqa: F401
    import vllm.model_executor.models.internvl  # noqa: F401 - the processor and the model
    from vllm import LLM  # noqa: F401

    from internvl_batch import cache, engine, hooks, replicas  # noqa: F401
except BaseException:  # noqa: BLE001 - any error: the fork server must keep running
    pass

atexit.register(os._exit, 0)  # after what these imports registered: see preload
