"""The settings that change a shard's captions, and the dataset they are of, recorded with
its rows.

A resumed run adds rows to those already written; if its prompt, sampling, model or tiling
differ, one file would mix two kinds of captions under metadata naming only the last, and if
its dataset differs, captions of one dataset would be published as another's. So every
chunk and the final file carry this fingerprint, and a run whose fingerprint differs from the
rows already there stops (exit 2) naming what differs, before any engine starts.

Computed without loading anything heavy (no transformers, no vLLM): the model's config.json is
hashed as bytes, its weight files by name and size (hashing gigabytes of weights would cost
minutes per start; a re-trained checkpoint saved under the same name with the same sizes is
the case this misses).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import ConfigError, RunConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class SettingsChanged(ConfigError):
    """Rows written with other settings are already in the output (exit 2)."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def model_identity(model: str) -> dict:
    """{model, model_config_hash, weights} for a checkpoint dir, a preset or a hub id."""
    if model.startswith("preset:"):
        from .checkpoint import PRESETS, build_config, parse_preset

        try:
            name, weights = parse_preset(model.split(":", 1)[1])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        cfg = json.dumps(build_config(PRESETS[name]), sort_keys=True)
        # tiny+weights and tiny+dummy caption differently: the kind is part of the identity
        return {"model": model, "model_config_hash": _sha(cfg.encode()),
                "weights": "random, seeded (synthesized)" if weights else
                           "dummy (synthesized)"}
    path = Path(model)
    if not path.is_dir():  # a hub id: its config is not read before the engine resolves it
        return {"model": model, "model_config_hash": None, "weights": None}
    cfg = path / "config.json"
    weights = sorted((p.relative_to(path).as_posix(), p.stat().st_size)
                     for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return {"model": os.path.realpath(path),
            "model_config_hash": _sha(cfg.read_bytes()) if cfg.is_file() else None,
            "weights": _sha(json.dumps(weights).encode()) if weights else "none"}


def of(cfg: RunConfig) -> dict:
    """Every setting that changes the captions of a shard, by the name a user knows it by."""
    e, s, p = cfg.engine, cfg.sampling, cfg.prompt
    fp = model_identity(e.model)
    fp.update({
        "prompt": p.prompt, "system_prompt": p.system_prompt,
        "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
        "seed": s.seed, "ignore_eos": s.ignore_eos,
        "max_dynamic_patch": e.max_dynamic_patch, "dtype": e.dtype,
        "load_format": e.load_format,
        # None for rows written before the setting existed as well (diff compares with .get)
        "quantization": e.quantization,
    })
    fp.update(cfg.source.identity())  # which record each seq is (resume skips by seq and id)
    return fp


# recorded since a later version: a fingerprint without them says nothing about them
LATER = {"dataset", "data_dir", "annotations", "split", "image_column", "caption_column",
         "id_column", "limit"}
# what decides the captions themselves; the rest says which records they are of. `merge`
# compares only these across shards: each shard holds its own records, and a cluster may
# stage the same dataset at a path of its own on every node
CAPTION_KEYS = ("model", "model_config_hash", "weights", "prompt", "system_prompt",
                "max_tokens", "temperature", "top_p", "seed", "ignore_eos",
                "max_dynamic_patch", "dtype", "load_format", "quantization")


FLAGS = {"model": "--model", "model_config_hash": "model config.json",
         "weights": "model weights", "prompt": "--prompt", "system_prompt": "--system-prompt",
         "max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
         "seed": "--seed", "ignore_eos": "--ignore-eos",
         "max_dynamic_patch": "--max-dynamic-patch", "dtype": "--dtype",
         "load_format": "--load-format", "quantization": "--quantization",
         "dataset": "--dataset", "data_dir": "--data-dir", "annotations": "--annotations",
         "split": "--split", "image_column": "--image-column",
         "caption_column": "--caption-column", "id_column": "--id-column", "limit": "--limit",
         "tars": "--dataset's tar files"}


def _short(v) -> str:
    """repr(v) within ~60 characters, its middle dropped: two paths or prompts differ at
    either end, so both ends stay visible."""
    s = repr(v)
    return s if len(s) <= 60 else s[:22] + "..." + s[-35:]


def diff(old: dict, new: dict) -> list[str]:
    """'--prompt 'a' -> 'b'' for each setting that differs (keys either side knows)."""
    out = []
    for k in [*new, *(k for k in old if k not in new)]:
        if k in LATER and (k not in old or k not in new):
            continue
        if old.get(k) != new.get(k):
            out.append(f"{FLAGS.get(k, k)} {_short(old.get(k))} -> {_short(new.get(k))}")
    return out


def check(old: dict | None, new: dict, where: str) -> None:
    """Raise SettingsChanged if rows in `where` were written with other settings. Rows from
    a version that recorded no fingerprint (None) are accepted: nothing to compare."""
    if old is None:
        return
    changes = diff(old, new)
    if changes:
        raise SettingsChanged(
            f"{where} holds rows written with other settings ({'; '.join(changes)}); "
            "pass --output DIR to write elsewhere, or --overwrite to replace them")
