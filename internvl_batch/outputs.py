"""Reading a finished output back: the part files of a run (one shard or a merged set, or a
single compacted Parquet file), its run metadata and its stats, for `show` and `score`.

Only the columns a caller names are read: a 100k-row output's `error` column is a few hundred
KB, its captions a few MB, and neither needs the images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .merge import SHARD_RE


class OutputError(ValueError):
    """No such output, or nothing readable in it: a user error (one line, exit 2)."""


@dataclass(frozen=True)
class Output:
    path: Path          # what the user named: a folder or one .parquet file
    files: tuple[Path, ...]
    # one line when shards of the run are not here (unfinished, or missing): what is read is
    # only part of the run, and `show` and `score` say so
    note: str | None = None

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def beside(self, name: str) -> Path:
        """Where a derived file goes: inside the output folder, or next to a single file as
        `<stem>.<name>`."""
        if self.path.is_dir():
            return self.path / name
        return self.path.with_name(f"{self.path.stem}.{name}")

    def num_rows(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)

    def read(self, columns: list[str]):
        """The named columns of every file, in file order (shard 0 first), as one table."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for f in self.files:
            names = pq.read_schema(f).names
            missing = [c for c in columns if c not in names]
            if missing:
                raise OutputError(f"{f} has no column {missing[0]!r}: not an internvl-batch "
                                  f"output (columns: {', '.join(names)})")
            tables.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(tables)

    def metadata(self) -> dict:
        """The run metadata (arguments, versions, …) of the first file; shards of one run
        share it apart from the shard index."""
        from .sinks import read_metadata

        try:
            return read_metadata(self.files[0])
        except ValueError:
            return {}

    def stats(self) -> dict | None:
        """merge's combined stats.json if present, else the one shard's .stats.json."""
        candidates = [self.folder / "stats.json"]
        if len(self.files) == 1:
            candidates.insert(0, self.files[0].with_name(
                self.files[0].name.removesuffix(".parquet") + ".stats.json"))
        for c in candidates:
            if c.is_file():
                try:
                    return json.loads(c.read_text())
                except ValueError:
                    return None
        return None


def open_output(path) -> Output:
    p = Path(path)
    if not p.exists():
        raise OutputError(f"{p} does not exist")
    if p.is_file():
        if p.suffix != ".parquet":
            raise OutputError(f"{p} is not a Parquet file or an output folder")
        return _readable(Output(p, (p,)))
    files = sorted(f for f in p.glob("part-*.parquet") if SHARD_RE.match(f.name))
    counts = sorted({int(SHARD_RE.match(f.name).group(2)) for f in files})
    if len(counts) > 1:  # a rerun with another --num-shards left the first run's files
        raise OutputError(f"{p} mixes runs with different shard counts {counts}: the same "
                          "images would be read twice; remove the stale part files "
                          "or name one .parquet file")
    if not files:
        hint = " (unfinished shards under _parts/: finish or merge the run first)" \
            if (p / "_parts").is_dir() else ""
        raise OutputError(f"no part-*.parquet in {p}{hint}")
    out = _readable(Output(p, tuple(files)))
    return Output(out.path, out.files, _absent_shards(p, files, counts[0], out.num_rows()))


def _absent_shards(folder: Path, files: list[Path], total: int, rows: int) -> str | None:
    """One line naming the shards of a `total`-shard run that have no final Parquet file
    here (unfinished: rows under _parts/; else missing), or None when all are here."""
    from .sinks import shard_name

    have = {int(SHARD_RE.match(f.name).group(1)) for f in files}
    absent = [shard_name(i, total) for i in range(total) if i not in have]
    if not absent:
        return None
    what = [f"{n} {'unfinished' if (folder / '_parts' / n).is_dir() else 'missing'}"
            for n in absent]
    listed = ", ".join(what[:3]) + (f" and {len(what) - 3} more" if len(what) > 3 else "")
    return (f"note: {folder} is partial: {len(absent)} of {total} shards have no Parquet "
            f"file ({listed}); using the {rows} rows of the other {total - len(absent)}")


def _readable(out: Output) -> Output:
    """`out`, once every file's footer reads (a few KB each): a truncated or foreign file is
    one line naming it, not a traceback from deep inside a reader."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in out.files:
        try:
            pq.read_metadata(f)
        except (pa.ArrowException, OSError) as e:
            raise OutputError(f"{f} is not a readable Parquet file "
                              f"({str(e).splitlines()[0]})") from None
    return out


def take(output: Output, indices, columns: list[str]):
    """Rows at the given global positions (file order), only `columns`, reading only the row
    groups that hold them; rows come back in ascending position order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = np.unique(np.asarray(indices, dtype=np.int64))
    parts, start = [], 0
    for f in output.files:
        pf = pq.ParquetFile(f)
        n = pf.metadata.num_rows
        mine = want[(want >= start) & (want < start + n)] - start
        rg_start = 0
        for rg in range(pf.metadata.num_row_groups):
            rg_n = pf.metadata.row_group(rg).num_rows
            local = mine[(mine >= rg_start) & (mine < rg_start + rg_n)] - rg_start
            if len(local):
                parts.append(pf.read_row_group(rg, columns=columns).take(pa.array(local)))
            rg_start += rg_n
        start += n
    if not parts:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.concat_tables(parts)
