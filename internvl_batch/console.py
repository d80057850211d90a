"""The terminal shows our lines; vLLM's, torch's and the engine processes' go to a log file.

Why at the file-descriptor level: vLLM logs to stdout, warnings and tensor dumps go to stderr,
and vLLM's engine-core process (and our replica processes) inherit our descriptors, so
redirecting Python's `logging` would miss most of it. While a `Console` is open, fds 1 and 2
point (from `capture()` on) at a pipe that a thread appends to the log file (and, with `verbosity > 0`, copies to
the terminal); our own messages are written to duplicates of the terminal's descriptors.
`LogTap` (engine.py) still works inside: it taps whatever fds 1/2 are.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from .config import ConfigError

QUIET, NORMAL, VERBOSE = -1, 0, 1


class Console:
    """`log_path` is OUTPUT/logs/SHARD.log (None: no redirection, e.g. in tests)."""

    def __init__(self, log_path: Path | None = None, verbosity: int = NORMAL):
        self.log_path, self.verbosity = log_path, verbosity
        self.out = sys.stdout  # what a script parses: the summary (or --json)
        self.err = sys.stderr  # our status lines, the progress bar, one-line errors
        self._saved: dict[int, int] = {}
        self._pump: threading.Thread | None = None
        self._read = [0]  # bytes the pump has moved so far

    def __enter__(self) -> "Console":
        return self

    def capture(self) -> None:
        """Start sending fds 1/2 to the log file. Called just before the engine starts, once
        the run's checks have passed: a run refused for bad input leaves no log behind."""
        if self.log_path is None or self._saved:
            return
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab", buffering=0)
        except OSError as e:  # the same words as the output lock's check (outlock.py)
            raise ConfigError(f"--output {self.log_path.parent.parent} is not writable: "
                              f"{e.strerror or e}") from None
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
        self.out = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        self.err = os.fdopen(os.dup(self._saved[2]), "w", buffering=1)
        r, w = os.pipe()
        echo = os.dup(self._saved[2]) if self.verbosity > 0 else None
        for fd in (1, 2):
            os.dup2(w, fd)
        os.close(w)
        self._pump = threading.Thread(target=_pump, args=(r, log, echo, self._read),
                                      daemon=True)
        self._pump.start()
        self.info(f"vLLM's log: {self.log_path}")

    def info(self, message: str) -> None:
        """A status line (not with -q)."""
        if self.verbosity > QUIET:
            print(message, file=self.err, flush=True)

    def error(self, message: str) -> None:
        print(message, file=self.err, flush=True)

    def __exit__(self, *exc) -> None:
        if not self._saved:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes our pipe's write ends at 1 and 2
            os.close(saved)
        self._saved = {}
        # EOF comes once every writer is gone, which may be never before we exit:
        # multiprocessing's resource tracker holds our stderr until then, and an engine
        # process still shutting down keeps the pipe too. So wait while lines still come,
        # up to 2 s: waiting for EOF cost every run 2 s after its end was recorded
        deadline, seen = time.monotonic() + 2.0, -1
        while self._pump.is_alive() and time.monotonic() < deadline and self._read[0] != seen:
            seen = self._read[0]
            self._pump.join(timeout=0.1)
        self.out.flush()
        self.err.flush()


def _pump(r: int, log, echo: int | None, read: list[int]) -> None:
    with os.fdopen(r, "rb", buffering=0) as src:
        while chunk := src.read(65536):
            read[0] += len(chunk)
            try:
                log.write(chunk)
            except OSError:  # a full disk must not block the engine's logging
                pass
            if echo is not None:
                try:
                    os.write(echo, chunk)
                except OSError:
                    pass
