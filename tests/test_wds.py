"""WebDataset tar shards (`--dataset wds:...`) on tars img2dataset itself wrote and on
hand-broken ones: what a sample becomes, sharding by tar, resume without reopening finished
tars, the bad-input table of the README row by row; end to end with real vLLM on CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from internvl_batch import fingerprint, sources
from internvl_batch.images import decode
from internvl_batch.sources import (TAR_STRIDE, SourceError, SourceSpec, Tar, assign_tars,
                                    list_tars, open_source, tar_samples)
from tests.conftest import needs_vllm
from tests.wds_data import (PER_TAR, cut, cut_offsets, img2dataset_tars, jpeg, mixed_members,
                            photo_captions, tar_members, write_tar)

HAS_IMG2DATASET = shutil.which("img2dataset", path=os.path.dirname(sys.executable)) is not None
needs_img2dataset = pytest.mark.skipif(not HAS_IMG2DATASET and not os.environ.get("CI"),
                                       reason="img2dataset is not installed (the test extra)")


@pytest.fixture(scope="session")
def i2d(tmp_path_factory) -> Path:
    """The folder of tars img2dataset wrote (read-only for tests: copy before breaking)."""
    if not HAS_IMG2DATASET and not os.environ.get("CI"):
        pytest.skip("img2dataset is not installed (the test extra)")
    return img2dataset_tars(tmp_path_factory.mktemp("img2dataset"))


def _records(value: str, shard: int = 0, shards: int = 1, **options):
    return list(open_source(SourceSpec.parse(value, **options), shard, shards))


def _tar(path: Path, index: int = 0) -> Tar:
    return Tar(index, str(path), path.stat().st_size)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every tar the reader opens, by file name."""
    seen, real = [], tarfile.open

    def spy(name, *a, **kw):
        seen.append(os.path.basename(name))
        return real(name, *a, **kw)
    monkeypatch.setattr(sources.tarfile, "open", spy)
    return seen


# -- what img2dataset's layout becomes -------------------------------------------------------

@needs_img2dataset
def test_img2dataset_tars_give_one_record_per_sample_keyed_and_captioned(i2d):
    tars = sorted(i2d.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    recs = open_source(SourceSpec.parse(f"wds:{i2d}/{{00000..00002}}.tar"))
    # the total comes from img2dataset's NNNNN_stats.json: 17 photos, the dead link left out
    assert recs.total == 17
    recs = list(recs)
    caps = photo_captions()
    expect = {}
    for t, tar in enumerate(tars):
        members = dict(tar_members(tar))
        keys = [n[:-4] for n in members if n.endswith(".jpg")]
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            assert meta["status"] == "success" and meta["key"] == key
            expect[key] = (t, members[f"{key}.jpg"], members[f"{key}.txt"].decode(),
                           caps[meta["url"].rsplit("/", 1)[1]])
    assert len(recs) == len(expect) == 17 and len({r.id for r in recs}) == 17
    for r in recs:
        t, image, txt, caption = expect[r.id]
        assert r.error is None and r.payload == image
        assert r.references == (txt,) and txt == caption  # .txt, and .json's copy once
        assert r.image_ref == f"{tars[t]}#{r.id}.jpg"
        assert r.seq // TAR_STRIDE == t
    assert [r.seq for r in recs] == sorted(r.seq for r in recs)
    assert [r.seq % TAR_STRIDE for r in recs] == [*range(6), *range(6), *range(5)]


@needs_img2dataset
def test_brace_patterns_and_globs_list_each_tar_once_in_order(i2d):
    one = [r.id for r in _records(f"wds:{i2d}/{{00000..00002}}.tar")]
    assert [r.id for r in _records(f"wds:{i2d}/*.tar")] == one
    assert [r.id for r in _records(f"wds:{i2d}/{{00000,00001,00000}}.tar")] == one[:12]
    tars = list_tars(f"{i2d}/{{00002,00000}}.tar")  # the order written is the order read
    assert [(t.index, os.path.basename(t.path)) for t in tars] == [(0, "00002.tar"),
                                                                  (1, "00000.tar")]
    rel = os.path.relpath(i2d)
    assert list_tars(f"{rel}/00000.tar")[0].path == str(i2d / "00000.tar")  # absolute


# -- sharding by tar ---------------------------------------------------------------------------

def test_tars_are_dealt_to_shards_by_size_deterministically():
    assert assign_tars([10] * 5, 2) == [[0, 2, 4], [1, 3]]  # equal sizes: round-robin
    assert assign_tars([90, 10, 10, 10, 10, 10, 10, 10, 10, 10], 2) == [[0], list(range(1, 10))]
    sizes = [7, 3, 9, 1, 4, 4, 8, 2]
    split = assign_tars(sizes, 3)
    assert split == assign_tars(list(sizes), 3)
    assert sorted(i for s in split for i in s) == list(range(8))
    loads = [sum(sizes[i] for i in s) for s in split]
    assert max(loads) - min(loads) <= max(sizes)
    assert assign_tars([5, 5], 3) == [[0], [1], []]  # more shards than tars: one has none


def test_each_shard_opens_only_its_own_tars(tmp_path, opened):
    for t, n in enumerate([4, 1, 1, 1]):  # tar 0 is as big as the three others
        write_tar(tmp_path / f"{t:05d}.tar",
                  [(f"{t}{i:03d}.jpg", bytes(30000)) for i in range(n)])
    opened.clear()
    spec = SourceSpec.parse(f"wds:{tmp_path}/{{00000..00003}}.tar")
    shard0 = open_source(spec, 0, 2)
    assert shard0.total == 4 and [r.id for r in shard0] == [f"0{i:03d}" for i in range(4)]
    assert set(opened) == {"00000.tar"}  # counted (no img2dataset stats) and read: its own
    opened.clear()
    shard1 = open_source(spec, 1, 2)
    assert shard1.total == 3 and [r.id for r in shard1] == ["1000", "2000", "3000"]
    assert set(opened) == {"00001.tar", "00002.tar", "00003.tar"}


def test_limit_counts_within_the_shard(tmp_path):
    for t in range(2):
        write_tar(tmp_path / f"{t}.tar", [(f"{t}{i}.jpg", jpeg()) for i in range(3)])
    assert [r.id for r in _records(f"wds:{tmp_path}/*.tar", limit=4)] == ["00", "01", "02", "10"]
    assert [r.id for r in _records(f"wds:{tmp_path}/*.tar", 1, 2, limit=2)] == ["10", "11"]
    assert open_source(SourceSpec.parse(f"wds:{tmp_path}/*.tar", limit=4)).total == 4


# -- resume --------------------------------------------------------------------------------

def _three_tars(root: Path) -> str:
    for t in range(3):
        write_tar(root / f"{t}.tar", [(f"{t}{i}.{s}", jpeg() if s == "jpg" else b"cap")
                                      for i in range(4) for s in ("jpg", "txt")])
    return f"wds:{root}/{{0..2}}.tar"


def test_resume_passes_over_finished_tars_without_opening_them(tmp_path, opened):
    value = _three_tars(tmp_path)
    every = _records(value)
    done = {r.seq for r in every[:6]}  # all of tar 0, half of tar 1
    opened.clear()
    records = open_source(SourceSpec.parse(value)).resume(done)
    assert records.total == 12  # tar 0 by its rows written, the others by their headers
    assert [r.id for r in records] == ["12", "13", "20", "21", "22", "23"]
    assert "0.tar" not in opened and "1.tar" in opened
    # --limit counts the written rows as the other kinds do: 8 records in all
    rest = list(open_source(SourceSpec.parse(value, limit=8)).resume(done))
    assert [r.id for r in rest] == ["12", "13"]


def test_resume_reads_a_tar_whose_rows_are_not_a_prefix(tmp_path):
    """Rows of a tar written out of order (never by `run`, which writes in order) make the
    reader open it and skip by position rather than trust it finished."""
    value = _three_tars(tmp_path)
    every = _records(value)
    done = {r.seq for r in every[:4] + every[5:8] + every[8:9]}  # tar 1 lacks "10"
    rest = list(open_source(SourceSpec.parse(value)).resume(done))
    assert [r.id for r in rest] == ["10", "21", "22", "23"]


def test_a_changed_tar_list_is_another_dataset(tmp_path):
    value = _three_tars(tmp_path)
    old = SourceSpec.parse(value).identity()
    assert old["tars"].startswith("3 tars, ")
    with open(tmp_path / "1.tar", "ab") as f:  # re-downloaded with another size
        f.write(bytes(10240))
    changes = fingerprint.diff(old, SourceSpec.parse(value).identity())
    assert len(changes) == 1 and changes[0].startswith("--dataset's tar files '3 tars, ")


# -- the bad-input table -------------------------------------------------------------------

@needs_img2dataset
@pytest.mark.parametrize("where", ["boundary", "header", "data"])
def test_truncated_tar_keeps_what_came_before_and_says_so_once(i2d, tmp_path, where):
    src = i2d / "00000.tar"
    bad = cut(src, tmp_path / "00000.tar", cut_offsets(src, 3)[where])
    shutil.copy(i2d / "00000_stats.json", tmp_path)
    recs = list(tar_samples(_tar(bad)))
    whole = list(tar_samples(_tar(src)))
    assert [r.id for r in recs[:3]] == [r.id for r in whole[:3]]
    assert all(r.error is None and r.payload for r in recs[:3])
    errors = [r.error for r in recs[3:]]
    if where == "data":  # the sample it cut, then the tar
        assert recs[3].id == whole[3].id and errors[0].startswith(
            "truncated tar: 00000.tar is cut short inside this sample (ReadError: ")
        errors = errors[1:]
    assert len(errors) == 1 and errors[0].startswith("truncated tar: 00000.tar is cut short (")
    assert errors[0].endswith(f"after {len(recs) - 1} samples (its img2dataset stats say "
                              f"{PER_TAR}); fetch the tar again")
    assert recs[-1].id == "00000.tar" and recs[-1].seq == len(recs) - 1
    # a resume that skips every position written reads the same positions, adds nothing
    assert [r for r in tar_samples(_tar(bad), set(range(len(recs)))) if r] == []


def test_bad_samples_are_error_rows_among_good_ones(tmp_path):
    tar = write_tar(tmp_path / "mixed.tar", mixed_members())
    recs = list(tar_samples(_tar(tar)))
    rows = [(r.seq, r.id, decode(r).error) for r in recs]
    assert [(s, i) for s, i, _ in rows] == [(0, "a"), (1, "b"), (2, "c"), (3, "a"), (4, "d"),
                                            (5, "e")]
    errors = [e for _, _, e in rows]
    assert errors[0] is None and errors[4] is None and errors[5] is None
    assert errors[1].startswith("not a readable image: ")
    assert errors[2] == ("no image in sample: it has .txt, .json; a sample needs .jpg, .jpeg, "
                         ".png, .webp")
    assert errors[3] == ("duplicate key: a is also sample 0 of mixed.tar; only that one is "
                         "captioned")
    assert recs[1].image_ref == f"{tar}#b.jpg" and recs[2].image_ref == f"{tar}#c"
    assert recs[2].references == ("no picture here", "from the json")
    assert recs[4].references == ("from the json",)
    # a duplicate stays one when its first is skipped on resume
    assert [(r.id, r.error.split(":")[0]) for r in tar_samples(_tar(tar), {0}) if r and r.error
            ] == [("c", "no image in sample"), ("a", "duplicate key")]


@pytest.mark.parametrize("content", [b"", b"<html>404</html>\n" * 40])
def test_a_file_that_is_no_tar_is_one_error_row(tmp_path, content):
    (tmp_path / "00000.tar").write_bytes(content)
    write_tar(tmp_path / "00001.tar", [("x.jpg", jpeg())])
    recs = _records(f"wds:{tmp_path}/*.tar")
    assert [(r.seq, r.id) for r in recs] == [(0, "00000.tar"), (TAR_STRIDE, "x")]
    assert recs[0].error.startswith("unreadable tar: 00000.tar (ReadError: ")
    assert "\n" not in recs[0].error


def test_duplicate_members_in_a_row_split_into_two_samples(tmp_path):
    tar = write_tar(tmp_path / "d.tar", [("k.jpg", jpeg()), ("k.jpg", jpeg((1, 2, 3)))])
    recs = list(tar_samples(_tar(tar)))
    assert [(r.id, r.error is None) for r in recs] == [("k", True), ("k", False)]


@pytest.mark.parametrize("pattern, message", [
    ("{root}/{{00000..00003}}.tar",
     "--dataset wds: 2 of the 4 tars of '{root}/{{00000..00003}}.tar' do not exist "
     "({root}/00002.tar, {root}/00003.tar); fix the pattern, or take the tars that are there "
     "with a glob (wds:DIR/*.tar)"),
    ("{root}/{{10..12}}.tar",
     "--dataset wds: no tar files match '{root}/{{10..12}}.tar'; fix the pattern, or take the "
     "tars that are there with a glob (wds:DIR/*.tar)"),
    ("{root}/sub/*.tar",
     "--dataset wds: no tar files match '{root}/sub/*.tar'; fix the pattern, or take the tars "
     "that are there with a glob (wds:DIR/*.tar)"),
    ("{root}", "--dataset wds: no tar files match '{root}'; {root} is a folder: use "
               "wds:{root}/*.tar"),
    ("{root}/{{0..2.tar", "--dataset wds:{root}/{{0..2.tar: unbalanced braces; write ranges as "
                          "{{00000..00331}} and lists as {{a,b}}"),
    ("pipe:curl -s http://x/{{0..2}}.tar", "--dataset wds:pipe:curl -s http://x/{{0..2}}.tar: "
     "reads local tar files (a path, a brace pattern or a glob), not URLs or pipes; copy or "
     "mount the tars and pass their path"),
])
def test_a_pattern_naming_missing_tars_is_one_line(tmp_path, pattern, message):
    for t in range(2):
        write_tar(tmp_path / f"{t:05d}.tar", [("x.jpg", jpeg())])
    (tmp_path / "sub").mkdir()
    value = pattern.format(root=tmp_path)
    with pytest.raises(SourceError) as e:
        open_source(SourceSpec.parse(f"wds:{value}"))
    assert str(e.value).startswith(message.format(root=tmp_path))
    assert "\n" not in str(e.value)


def test_the_cli_exits_2_with_one_line_for_a_missing_tar(tmp_path):
    """Before any engine starts (the model named does not even exist)."""
    write_tar(tmp_path / "00000.tar", [("x.jpg", jpeg())])
    p = subprocess.run([sys.executable, "-m", "internvl_batch", "run", "--dataset",
                        f"wds:{tmp_path}/{{00000..00001}}.tar", "--model", str(tmp_path / "m"),
                        "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines == [f"Error: --dataset wds: 1 of the 2 tars of '{tmp_path}/{{00000..00001}}"
                     f".tar' do not exist ({tmp_path}/00001.tar); fix the pattern, or take the "
                     "tars that are there with a glob (wds:DIR/*.tar)"], p.stderr


# -- the progress bar's total --------------------------------------------------------------

@needs_img2dataset
def test_total_from_img2dataset_stats_then_parquet_then_headers(i2d, tmp_path, opened,
                                                                 monkeypatch):
    for f in i2d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    value = f"wds:{tmp_path}/*.tar"
    assert open_source(SourceSpec.parse(value)).total == 17 and opened == []  # stats.json
    for f in tmp_path.glob("*_stats.json"):
        f.unlink()
    assert open_source(SourceSpec.parse(value)).total == 17 and opened == []  # .parquet
    for f in tmp_path.glob("*.parquet"):
        f.unlink()
    assert open_source(SourceSpec.parse(value)).total == 17 and len(opened) == 3  # headers
    monkeypatch.setattr(sources, "COUNT_HEADERS_BYTES", 1000)  # too many bytes to count
    assert open_source(SourceSpec.parse(value)).total is None


# -- show ------------------------------------------------------------------------------------

def test_gallery_reads_images_back_from_their_tars(tmp_path):
    from internvl_batch.gallery import ImageLocator

    tar = write_tar(tmp_path / "mixed.tar", mixed_members())
    rows = [{"image_ref": r.image_ref} for r in tar_samples(_tar(tar))]
    members = dict(mixed_members()[:2])
    got = ImageLocator(None, {"config": {"source": {"kind": "wds"}}}).locate(rows)
    assert got[0] == (members["a.jpg"], None)
    assert got[2] == (None, "no image member")  # c has none
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(tar, moved / "mixed.tar")
    got = ImageLocator(None, {"config": {"source": {"kind": "wds"}}},
                       image_root=moved).locate(rows)
    assert got[0] == (members["a.jpg"], None)


# -- end to end, real vLLM on CPU ----------------------------------------------------------

def _expected(tars: list[Path]) -> dict[str, tuple[str, str]]:
    """key -> (its .txt caption, its image member's ref) over img2dataset's tars."""
    out = {}
    for tar in tars:
        members = dict(tar_members(tar))
        for name in members:
            if name.endswith(".jpg"):
                key = name[:-4]
                out[key] = (members[f"{key}.txt"].decode(), f"{tar}#{name}")
    return out


@needs_vllm
@needs_img2dataset
@pytest.mark.vllm
def test_cli_run_on_img2dataset_tars(i2d, tiny_model, tmp_path, clean_env):
    """`internvl-batch run --dataset 'wds:.../{00000..00002}.tar'`, one engine start: a row
    per sample, the sample's key as id, its .txt caption as the reference."""
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "internvl_batch", "run", "--dataset",
         f"wds:{i2d}/{{00000..00002}}.tar", "--model", tiny_model, "--output", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--max-tokens", "4", "--batch-size", "8",
         "--max-model-len", "4096", "--no-progress"],
        capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = pq.read_table(out / "part-00000-of-00001.parquet").to_pylist()
    expect = _expected(sorted(i2d.glob("*.tar")))
    assert len(rows) == len(expect) == 17
    assert sorted(r["id"] for r in rows) == sorted(expect)
    for r in rows:
        assert r["error"] is None and isinstance(r["caption"], str), r
        assert (r["references"][0], r["image_ref"]) == expect[r["id"]] and \
            len(r["references"]) == 1
        assert r["output_tokens"] >= 1 and r["tiles"] >= 1
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    st = json.loads((out / "part-00000-of-00001.stats.json").read_text())
    assert st["rows"] == st["images"] == 17 and st["errors"] == 0


@pytest.fixture
def broken(i2d, tmp_path) -> str:
    """img2dataset's three tars, the second cut inside its fourth sample's image, then a
    tar of bad samples among good ones and a file that is no tar: a wds: value."""
    data = tmp_path / "data"
    data.mkdir()
    for f in i2d.iterdir():
        shutil.copy(f, data / f.name)
    cut(i2d / "00001.tar", data / "00001.tar", cut_offsets(i2d / "00001.tar", 3)["data"])
    write_tar(data / "00003.tar", mixed_members())
    (data / "00004.tar").write_text("<html>404 Not Found</html>\n")
    return f"wds:{data}/{{00000..00004}}.tar"


@needs_vllm
@needs_img2dataset
@pytest.mark.vllm
def test_sharded_run_with_broken_tars_stopped_and_resumed(engine, engine_spec, broken, i2d,
                                                         tmp_path, opened, clean_env):
    """Two shards by tar size; each opens only its tars; shard 0 is stopped (SIGUSR1)
    after its first tar and resumed without reopening it; the bad-input rows are there once,
    every sample once, and both shards exit 0 (errors under --max-error-rate)."""
    import signal
    import threading

    from internvl_batch.config import RunConfig, SamplingSpec
    from internvl_batch.merge import merge_output
    from internvl_batch.pipeline import EXIT_OK, EXIT_PREEMPTED, run
    from internvl_batch.stats import error_kind

    out = tmp_path / "out"
    tars = list_tars(broken.split(":", 1)[1])
    split = assign_tars([t.size for t in tars], 2)
    names = [[os.path.basename(tars[i].path) for i in s] for s in split]
    assert names == [["00000.tar", "00003.tar", "00004.tar"], ["00001.tar", "00002.tar"]]

    def cfg(shard):
        return RunConfig(source=SourceSpec.parse(broken), engine=engine_spec, output=out,
                         sampling=SamplingSpec(max_tokens=4), batch_size=1, workers=0,
                         progress=False, num_shards=2, shard_index=shard)

    parts = out / "_parts" / "part-00000-of-00002"

    def preempt():  # tar 0's six rows and one more written; one row a batch: 5+ of 13 to come
        for _ in range(6000):
            chunks = list(parts.glob("chunk-*.parquet")) if parts.is_dir() else []
            if sum(pq.read_metadata(c).num_rows for c in chunks) >= 7:
                break
            threading.Event().wait(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    t = threading.Thread(target=preempt)
    t.start()
    assert run(cfg(0), started=engine) == EXIT_PREEMPTED
    t.join()
    # tar 0 and what it read of tar 3; 3 and 4 counted for the total (no img2dataset stats)
    assert set(opened) == {"00000.tar", "00003.tar", "00004.tar"}
    opened.clear()
    assert run(cfg(0), started=engine) == EXIT_OK
    assert "00000.tar" not in opened and set(opened) <= {"00003.tar", "00004.tar"}
    opened.clear()
    assert run(cfg(1), started=engine) == EXIT_OK
    assert set(opened) == {"00001.tar", "00002.tar"}

    rows = [r for s in range(2)
            for r in pq.read_table(out / f"part-{s:05d}-of-00002.parquet").to_pylist()]
    assert len(rows) == len({r["seq"] for r in rows}) == 13 + 10
    kinds = sorted(error_kind(r["error"]) for r in rows if r["error"])
    assert kinds == ["duplicate key", "no image in sample", "not a readable image",
                     "truncated tar", "truncated tar", "unreadable tar"]
    captioned = [r["id"] for r in rows if r["error"] is None]
    whole = _expected([i2d / "00000.tar", i2d / "00002.tar"])
    first3 = [r.id for r in list(tar_samples(_tar(i2d / "00001.tar")))[:3]]
    assert sorted(captioned) == sorted([*whole, *first3, "a", "d", "e"])
    assert all(isinstance(r["caption"], str) for r in rows if r["error"] is None)
    ok, report = merge_output(out)
    assert ok, report
