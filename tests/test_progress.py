"""Progress lines off a terminal (Slurm logs) and the bar's numbers."""
from __future__ import annotations

import io
import re

from internvl_batch.progress import Progress, _fmt_eta


def test_not_a_tty_prints_plain_lines_without_carriage_returns():
    out = io.StringIO()
    p = Progress(100, "caption shard 0/1", stream=out, tty=False, interval=0.0)
    p.phase("starting engine")
    p.begin()
    for _ in range(4):
        p.update(25, err=0)
    p.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert "starting engine" in lines[0]
    assert re.search(r"100/100 img \(100\.0%\), [\d.]+ img/s, ETA 00:00, err 0$", lines[-1])
    assert any("25/100 img (25.0%)" in line and "ETA" in line for line in lines)


def test_interval_limits_the_lines():
    out = io.StringIO()
    p = Progress(None, "x", stream=out, tty=False, interval=3600)
    p.begin()
    for _ in range(50):
        p.update(1)
    p.close()
    # 'started', then nothing until close writes the final count (unknown total: no %)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].endswith("img/s") and "50 img" in lines[-1]


def test_disabled_prints_nothing_but_counts():
    out = io.StringIO()
    p = Progress(10, "x", stream=out, tty=False, enabled=False, initial=3)
    p.phase("starting engine")
    p.update(2)
    p.close()
    assert out.getvalue() == "" and p.n == 5 and p.status().startswith("5/10 img (50.0%)")


def test_tty_uses_a_bar_with_total_and_percent():
    out = io.StringIO()
    p = Progress(8, "cap", stream=out, tty=True)
    p.phase("starting engine")
    p.begin()
    p.update(4)
    p.close()
    assert "starting engine" in out.getvalue() and "50%" in out.getvalue()


def test_eta_format():
    assert _fmt_eta(59.6) == "01:00" and _fmt_eta(3725) == "1:02:05"
