"""internvl-batch: caption image datasets with InternVL on vLLM, at GPU speed, resumably."""
import time as _time

__version__ = "0.1.0"
# When this process began running our code (the first import of the package, before the
# command line's own imports). A run's clock starts here rather than at the process's start
# in /proc: that is when the process was forked, and `bash -c "install && internvl-batch
# run"` forks once and execs the last command, so the install would count as the run's.
STARTED_AT = _time.time()
