"""vLLM's input processing in the decode workers (preprocess.py): the planning around it
without vLLM, then with the real vLLM on CPU: a worker's rendered input is the engine's own,
bit for bit, and a run fed by workers writes the rows a run fed by the engine writes."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from internvl_batch import preprocess, sizing
from internvl_batch.config import ConfigError, EngineSpec, PromptSpec, RunConfig, SamplingSpec
from internvl_batch.sources import SourceSpec
from tests.conftest import needs_vllm
from tests.helpers import make_coco


def test_auto_renders_in_the_workers_on_a_gpu_and_in_the_engine_on_cpu():
    spec = EngineSpec(model="m")
    assert preprocess.choose("auto", spec, cuda=True) == "workers"
    assert preprocess.choose("auto", spec, cuda=False) == "engine"
    assert preprocess.choose("workers", spec, cuda=False) == "workers"
    # vLLM's processor cache must live where prompts are rendered
    cached = EngineSpec(model="m", mm_cache_gb=4)
    assert preprocess.choose("auto", cached, cuda=True) == "engine"
    with pytest.raises(ConfigError, match="--mm-cache-gb"):
        preprocess.choose("workers", cached, cuda=True)
    with pytest.raises(ConfigError, match="choose from"):
        preprocess.choose("gpu", spec, cuda=True)


def test_the_feed_plan_follows_the_cores_and_the_largest_image():
    # 16 cores, 4 replicas (front + engine core each), the main process: 7 workers
    coco = sizing.plan_feed(render_in_workers=True, replicas=4, cpus=16, workers=None,
                            batch_size=256, tiles=13, side=448)
    per_image = 13 * 3 * 448 * 448 * 2
    assert coco["workers"] == 7 and coco["preprocess"] == "workers"
    assert coco["batch_size"] == sizing.BATCH_BYTES // per_image == 34
    assert coco["window"] == 68
    one_tile = sizing.plan_feed(render_in_workers=True, replicas=4, cpus=16, workers=None,
                                batch_size=256, tiles=1, side=448)
    assert one_tile["batch_size"] == 256  # 256 one-tile images are ~300 MB
    engine = sizing.plan_feed(render_in_workers=False, replicas=1, cpus=2, workers=None,
                              batch_size=256, tiles=13, side=448)
    assert engine == {"preprocess": "engine", "workers": sizing.DEFAULT_WORKERS,
                      "batch_size": 256, "window": 512, "max_tiles": 13,
                      "rendered_mb_per_image": None}
    assert sizing.plan_feed(render_in_workers=True, replicas=1, cpus=2, workers=5,
                            batch_size=8, tiles=13, side=448)["workers"] == 5


def test_max_tiles_reads_the_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"max_dynamic_patch": 12, "use_thumbnail": true, '
                                          '"force_image_size": 448}')
    assert sizing.max_tiles(str(tmp_path), None) == (13, 448)
    assert sizing.max_tiles(str(tmp_path), 1) == (1, 448)  # one tile: no thumbnail
    assert sizing.max_tiles(str(tmp_path / "nowhere"), None) == (13, 448)


# -- with the real vLLM (CPU) ------------------------------------------------------------------

def _images():
    """A COCO-sized photo-like image (several tiles), a square one (one tile at 448 px), a
    tall one: three tilings."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for w, h in ((640, 480), (448, 448), (300, 900))]


@needs_vllm
@pytest.mark.vllm
def test_a_workers_rendered_input_is_the_engines_own(engine, engine_spec):
    """The renderer a decode worker builds from the engine's keyword arguments makes exactly
    what the engine's own `LLM` makes for the same prompt: token ids, placeholders, hashes and
    every pixel tensor; and the engine answers the rendered input as it answers the raw one
    (greedy token ids identical)."""
    from internvl_batch import prompts

    eng = engine[0]
    renderer = preprocess.Renderer(preprocess.renderer_kwargs(engine_spec, cuda=False))
    text = prompts.render(PromptSpec())
    raw = [prompts.request(text, im) for im in _images()]
    for req in raw:
        mine, own = renderer.render(req), eng.llm._preprocess_cmpl_one(req)
        assert preprocess.engine_input_equal(mine, own) == []
        assert mine["mm_kwargs"]["image"][0].get_data()["pixel_values_flat"].shape[0] >= 1
    tiles = [renderer.render(r)["mm_kwargs"]["image"][0].get_data()["pixel_values_flat"].shape[0]
             for r in raw]
    assert len(set(tiles)) > 1, tiles  # the three images were tiled differently
    sampling = SamplingSpec(max_tokens=8)
    a = eng.generate(raw, sampling)
    b = eng.generate([renderer.process(r) for r in raw], sampling)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.image_tokens for r in a] == [r.image_tokens for r in b]


def _cfg(engine_spec, images, ann, out, **kw):
    return RunConfig(source=SourceSpec.parse("coco", data_dir=str(images), annotations=str(ann)),
                     engine=engine_spec, output=Path(out), sampling=SamplingSpec(max_tokens=6),
                     batch_size=4, workers=2, progress=False, **kw)


@needs_vllm
@pytest.mark.vllm
def test_a_run_fed_by_rendering_workers_writes_the_engines_rows(engine, engine_spec, coco_bad,
                                                                tmp_path):
    """Bad images stay error rows, every caption is the one the engine-rendered run writes,
    and the stats say how the run was fed; a prompt longer than the model takes fails its
    rows in the workers, one by one, never the run."""
    from internvl_batch.pipeline import EXIT_OK, run

    images, ann = coco_bad
    rows = {}
    for mode in ("engine", "workers"):
        out = tmp_path / mode
        assert run(_cfg(engine_spec, images, ann, out, preprocess=mode), started=engine) == EXIT_OK
        rows[mode] = pq.read_table(out / "part-00000-of-00001.parquet").to_pylist()
        doc = json.loads((out / "part-00000-of-00001.stats.json").read_text())
        assert doc["runs"][-1]["feed"]["preprocess"] == mode
        assert doc["runs"][-1]["feed"]["workers"] == 2
    keys = ("id", "seq", "caption", "error", "prompt_tokens", "image_tokens", "output_tokens")
    assert [{k: r[k] for k in keys} for r in rows["workers"]] == \
        [{k: r[k] for k in keys} for r in rows["engine"]]
    assert sum(r["error"] is None for r in rows["workers"]) >= 10

    small, small_ann = make_coco(tmp_path / "small", 3)
    out = tmp_path / "too-long"
    cfg = dataclasses.replace(_cfg(engine_spec, small, small_ann, out, preprocess="workers"),
                              prompt=PromptSpec("word " * 5000), max_error_rate=1.0)
    assert run(cfg, started=engine) == EXIT_OK
    bad = pq.read_table(out / "part-00000-of-00001.parquet").to_pylist()
    assert len(bad) == 3 and all(r["error"].startswith("preprocess:") for r in bad), bad


def test_a_worker_that_cannot_build_the_renderer_stops_the_run_not_each_row(monkeypatch,
                                                                             tmp_path):
    """No row can be rendered without vLLM's renderer: the first batch raises one error
    (the run exits 4 with it) instead of writing an error row for every image."""
    from PIL import Image

    from internvl_batch import images
    from internvl_batch.sources import Record

    path = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(path)

    def broken():
        raise OSError("config.json: no such file")

    monkeypatch.setattr(preprocess, "worker_renderer", broken)
    rec = Record(id="a", seq=0, payload=str(path), image_ref=str(path), references=())
    with pytest.raises(images.RendererFailed, match="could not set up vLLM's renderer: OSError"):
        images._decode_many([rec], None, ("prompt", None))
    assert images._decode_many([], None, ("prompt", None)) == []
