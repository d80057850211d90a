"""The processes of a run: who starts which, how, and who stops whom.

Who asked for whom (`run --replicas N --workers W`; with the fork server, the replicas, the
engine cores and vLLM's workers are the server's children in /proc, not their asker's):

    main (`internvl-batch run`: reads, dispatches, writes; a child subreaper)
    ├── resource tracker ... multiprocessing's; leaves once nobody holds its pipe
    ├── fork server ........ spawned; imports torch and vLLM once (preload*.py), forks on request
    ├── decode worker × W .. spawned (images.make_pool)
    ├── replica × N ........ `replicas.main`, a process group of its own: forked by the server
    │   │                    (CPU), or spawned (GPU); batches in on its command pipe, results
    │   │                    out on its reply pipe (children.py)
    │   └── vLLM engine core  forked by the server (else spawned), in the replica's group
    │       └── vLLM worker   the same (vLLM's multiprocess executor)
    └── vLLM engine core ... with one engine (no replicas), in main's group; its worker below

`Child` (children.py) starts a replica, and the benchmark's workers, as a multiprocessing
process whose target is a library function; `use_for_vllm` (start.py) makes vLLM start its
engine core and workers through the same process class. Nothing runs the command line.

Who signals whom:

* A stop (Slurm's SIGUSR1 or SIGTERM, `timeout`'s SIGTERM, Ctrl-C's SIGINT) reaches main's
  process group. Main traps it (pipeline: finish the batch, flush, exit 75; 130 for SIGINT);
  decode workers ignore it (main stops their pool); the fork server dies of SIGTERM; main's
  own engine core shuts down as vLLM does. Replicas are in groups of their own: main closes
  their command pipes, each closes its engine (vLLM SIGTERMs its engine core, SIGKILLs it
  after a grace) and leaves; a replica still starting is SIGKILLed with its group.
* At its end main closes the fork server's `alive` pipe (the server leaves), waits for what
  is left below it and SIGTERMs, then SIGKILLs the rest (`lifeline.reap_descendants`).
* Main killed without a chance to clean up (kill -9, the kernel's OOM killer): nobody
  signals. Every process started here watches the process that asked for it
  (`lifeline.watch`) and leaves when that one is gone; a replica SIGKILLs its group (its
  engine core and workers) on the way. The fork server leaves at EOF on its `alive` pipe,
  whose write end only main holds.

How they start: one setting, the environment variable INTERNVL_BATCH_START_METHOD (read by
every process of the run, so not a command-line option):

* `auto` (default): vLLM's engine cores and workers are forked from the fork server; so are
  the replicas on CPU, while a GPU spawns them (`start.fork_replicas` says why);
* `forkserver`: replicas forked on a GPU too;
* `spawn`: every process is a fresh interpreter (vLLM's own way).
"""
import signal

# the signals that stop a run (Slurm preemption: SIGUSR1/SIGTERM; Ctrl-C: SIGINT). `run`
# traps them (pipeline._Signals) and its decode workers ignore them (images.make_pool)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
REPLICA_NAME = "ivb-replica"  # a replica's name in /proc (stats.host_memory's roles)
