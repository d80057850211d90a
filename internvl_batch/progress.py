"""Progress on long work: a tqdm bar on a terminal, plain lines in a log file.

Why not tqdm alone: under Slurm stderr is a file, and tqdm's `\\r` frames turn into one
unreadable line per refresh; there a line every `interval` seconds says the same. The bar is
shown before the engine starts (it takes 45-80 s on CPU, minutes cold on GPU) with the phase
as its description, so a user sees at once that the run is alive and how much there is to do.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Rows done out of `total` (None: unknown). `phase()` names what is happening now."""

    def __init__(self, total: int | None, desc: str, *, initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, tty: bool | None = None, interval: float = 30.0,
                 unit: str = "img"):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.postfix: dict = {}
        self._t0 = time.monotonic()
        self._rate_t0: float | None = None  # set by begin(): engine start is not throughput
        self._last_line = 0.0
        self._bar = None
        self._closed = False
        if enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             file=self.stream, dynamic_ncols=True, mininterval=1.0)

    def phase(self, text: str) -> None:
        """E.g. 'starting engine': shown in the bar's description, or as a line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description(f"{self.desc} ({text})")
        else:
            self._line(text)

    def begin(self) -> None:
        """The work proper starts now (the engine is up): the rate and ETA count from here."""
        self._rate_t0 = time.monotonic()
        if self._bar is not None:
            self._bar.set_description(self.desc)
            self._bar.reset(total=self.total)
            self._bar.update(self.n)
        elif self.enabled:
            self._line("started")

    def update(self, n: int, **postfix) -> None:
        if self._rate_t0 is None:
            self._rate_t0 = self._t0
        self.n += n
        self.postfix = postfix
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif time.monotonic() - self._last_line >= self.interval:
            self._line()

    def status(self) -> str:
        """'512/2000 img (25.6%), 41.0 img/s, ETA 00:36' from the counts alone."""
        done = self.n - self.initial
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total is not None
                 else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.1f}%)"
        if self._rate_t0 is not None and done > 0:
            rate = done / max(time.monotonic() - self._rate_t0, 1e-9)
            parts.append(f"{rate:.1f} {self.unit}/s")
            if self.total is not None and rate > 0:
                parts.append(f"ETA {_fmt_eta(max(self.total - self.n, 0) / rate)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _line(self, phase: str | None = None) -> None:
        self._last_line = time.monotonic()
        elapsed = _fmt_eta(self._last_line - self._t0)
        what = phase if phase is not None else self.status()
        print(f"[{elapsed}] {self.desc}: {what}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n > self.initial:
            self._line()  # the final count, whatever the interval
