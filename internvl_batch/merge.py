"""Merge: check that every shard of an output directory is complete; combine their stats."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import stats as stats_mod
from .config import ConfigError
from .sinks import SHARD_RE, WriteFailed, first_line, shard_name


def merge_output(output: Path, compact: Path | None = None,
                 max_error_rate: float | None = None) -> tuple[bool, str]:
    """(ok, report). A shard that is complete but whose rows failed above the error rate
    makes it not ok, as it made that shard's `run` exit 3: by default the rate each shard
    was run with (its stats' metadata), else `max_error_rate` for all."""
    if not output.is_dir():
        return False, f"merge: {output} does not exist"
    if compact is not None:
        _check_compact_dest(output, compact)
        if not compact.parent.is_dir():
            return False, (f"merge: --compact {compact}: the folder {compact.parent} does not "
                           "exist; create it or name a file in an existing one")
    names = {m.group(0) for p in output.iterdir() if (m := SHARD_RE.match(p.name))}
    names |= {m.group(0) for p in (output / "_parts").glob("*") if (m := SHARD_RE.match(p.name))}
    counts = {int(SHARD_RE.match(n).group(2)) for n in names}
    if not counts:
        return False, f"merge: no shards in {output}"
    if len(counts) > 1:
        return False, _failed(output, [f"merge: {output} mixes runs with different shard "
                                       f"counts {sorted(counts)}"])
    total = counts.pop()
    missing, failed, shards, broken, gone = [], [], [], [], []
    for i in range(total):
        name = shard_name(i, total)
        pq_path, st_path = output / f"{name}.parquet", output / f"{name}.stats.json"
        if pq_path.is_file() and st_path.is_file():
            st, bad = _read_shard(pq_path, st_path)
            if bad:
                broken.append(f"merge: {name}: {bad}; rerun it with --overwrite")
            else:
                shards.append((name, st))
        elif (output / "_parts" / name).is_dir():
            failed.append(name)  # started, never finished: failed, preempted or still running
        elif st_path.is_file():
            gone.append(name)  # its stats say it finished: its rows were deleted or moved
        elif pq_path.is_file():
            broken.append(f"merge: {name}: {st_path.name} is gone (deleted or moved after "
                          "the shard finished); put it back, or rerun the shard with "
                          "--overwrite")
        else:
            missing.append(name)
    lines = []
    if shards:
        lines.append(f"{'shard':<22} {'rows':>8} {'errors':>7} {'img/s':>9} {'out tok/s':>10} "
                     f"{'cache':>6}")
        for name, s in shards:
            cache = "-" if s.get("cache_hit") is None else ("hit" if s["cache_hit"] else "miss")
            lines.append(f"{name:<22} {_shard_rows(s):>8} {s['errors']:>7} "
                         f"{float(s.get('images_per_s') or 0):>9.2f} "
                         f"{float(s.get('output_tokens_per_s') or 0):>10.1f} {cache:>6}")
    lines += broken
    if failed:
        lines.append(f"merge: incomplete shards (failed or still running): {', '.join(failed)}")
    if gone:
        lines.append(f"merge: finished shards whose Parquet file is gone (deleted or moved "
                     f"after they finished): {', '.join(gone)}; put the files back, or rerun "
                     "those shards")
    if missing:
        lines.append(f"merge: missing shards (never started): {', '.join(missing)}")
    if broken or failed or missing or gone:
        return False, _failed(output, lines)
    differ = _settings_differ(output, [n for n, _ in shards])
    if differ:
        return False, _failed(output, lines + differ)
    failed_rate = _over_error_rate(shards, max_error_rate)
    if failed_rate:
        return False, _failed(output, lines + failed_rate)
    summary = stats_mod.merge_parallel([s for _, s in shards])
    summary["rows_in_output"] = sum(_shard_rows(s) for _, s in shards)
    summary["shards"] = total
    doc = {**summary, "per_shard": {n: {k: s.get(k) for k in stats_mod.KEYS} for n, s in shards}}
    _write_new(output / "stats.json", lambda tmp: tmp.write_text(
        json.dumps(doc, indent=2, default=str)))
    if compact:
        _compact(output, total, compact)
        lines.append(f"compacted {summary['rows_in_output']} rows into {compact}")
    lines.append(stats_mod.table(summary, f"merged {total} shards: "
                                          f"{summary['rows_in_output']} rows"))
    return True, "\n".join(lines)


def _failed(output: Path, lines: list[str]) -> str:
    """The report of a merge that failed. The stats.json of an earlier merge that succeeded
    goes: it counts rows that are no longer all there (or no longer agree), and a reader of
    the folder would take it for the output's figures."""
    stale = output / "stats.json"
    if stale.is_file():
        try:
            stale.unlink()
            lines = lines + [f"merge: removed {stale} (an earlier merge's figures, which no "
                             "longer describe these shards)"]
        except OSError as e:
            lines = lines + [f"merge: {stale} is an earlier merge's and no longer describes "
                             f"these shards, but cannot be removed ({e.strerror or e})"]
    return "\n".join(lines)


def _over_error_rate(shards: list[tuple[str, dict]], max_error_rate: float | None) -> list[str]:
    """Lines naming each shard whose failed rows are above the error rate: a Slurm merge
    must not turn a shard its run failed (exit 3) into a merged output that exits 0."""
    from .config import DEFAULT_MAX_ERROR_RATE

    out = []
    for name, s in shards:
        rate = max_error_rate
        if rate is None:
            config = (s.get("metadata") or {}).get("config") or {}
            rate = config.get("max_error_rate", DEFAULT_MAX_ERROR_RATE)
        counts = {"rows": _shard_rows(s), "errors": s.get("errors"),
                  "error_kinds": s.get("error_kinds")}
        bad = stats_mod.error_rate_exceeded(counts, rate)
        if bad:
            out.append(f"merge: {name}: {bad}; see its error column, fix the input and rerun "
                       "it with --overwrite, or merge with a higher --max-error-rate")
    return out


def _settings_differ(output: Path, names: list[str]) -> list[str]:
    """Lines naming each shard whose captions were made with other settings than the first
    shard's (the caption settings of the fingerprint, not the dataset: each shard holds its
    own records, and nodes may stage the data at paths of their own). One merged file must
    not mix two prompts or two models under one header."""
    from .fingerprint import CAPTION_KEYS, diff
    from .sinks import read_metadata

    def caption_settings(name: str) -> dict | None:
        fp = read_metadata(output / f"{name}.parquet").get("fingerprint")
        return {k: fp.get(k) for k in CAPTION_KEYS} if fp is not None else None

    first = caption_settings(names[0])
    out = []
    for name in names[1:]:
        fp = caption_settings(name)
        if first is not None and fp is not None and fp != first:
            out.append(f"merge: {name} was captioned with other settings than {names[0]} "
                       f"({'; '.join(diff(first, fp))}); rerun it with the same settings "
                       "(--overwrite)")
    return out


def _shard_rows(st: dict):
    """A shard's row count from its stats: `rows_in_shard` (all its runs), else `rows`."""
    return st.get("rows_in_shard", st.get("rows"))


def _check_compact_dest(output: Path, dest: Path) -> None:
    """--compact must not name a file merge reads or keeps: a shard's Parquet or stats file,
    anything under _parts/, the merged stats.json. Compacting onto shard 0 replaced it by
    every row, and the next merge published them twice."""
    out, d = output.resolve(), dest.resolve()
    inside = d.parent == out and (SHARD_RE.match(d.name) or d.name == "stats.json")
    if inside or out / "_parts" in d.parents:
        raise ConfigError(f"merge: --compact {dest} is one of {output}'s own files; name a "
                          f"new file, e.g. {output / 'all.parquet'}")


def _read_shard(pq_path: Path, st_path: Path) -> tuple[dict | None, str | None]:
    """(stats, None) for a shard whose stats parse and whose Parquet file holds the rows its
    stats count; else (None, what is wrong)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        st = json.loads(st_path.read_text())
        rows = _shard_rows(st)
        if not isinstance(rows, int) or not isinstance(st.get("errors"), int):
            raise ValueError("no row and error counts")
    except (OSError, ValueError, AttributeError) as e:
        return None, f"cannot read {st_path.name} ({first_line(e)})"
    try:
        have = pq.read_metadata(pq_path).num_rows
    except (pa.ArrowException, OSError) as e:
        return None, (f"cannot read {pq_path.name} ({first_line(e)}): not a whole Parquet "
                      "file")
    if have != rows:
        return None, (f"{pq_path.name} holds {have} rows, its stats count {rows} (changed "
                      "after its run finished)")
    return st, None


def _write_new(dest: Path, write) -> None:
    """`write(tmp)` then rename onto `dest`: a full disk leaves the old `dest` (or none),
    never a cut one; the error is WriteFailed naming the file (exit 5)."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"merge: cannot write {dest}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _compact(output: Path, total: int, dest: Path):
    import pyarrow.parquet as pq

    paths = [output / f"{shard_name(i, total)}.parquet" for i in range(total)]
    schema = pq.read_schema(paths[0])

    def write(tmp: Path):
        with pq.ParquetWriter(tmp, schema) as w:
            for p in paths:
                for batch in pq.ParquetFile(p).iter_batches(batch_size=8192):
                    w.write_batch(batch)

    _write_new(dest, write)
