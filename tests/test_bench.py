"""`internvl-batch bench` and its report: FLOP formulas, statistics, writers (pure, fast), and
one real CPU run (marked vllm)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_batch import bench
from internvl_batch.bench import report
from internvl_batch.checkpoint import config_copy

ROOT = Path(__file__).resolve().parent.parent


# -- roofline ---------------------------------------------------------------------------------

def test_vit_flops_per_tile_internvit_300m():
    # 1025 tokens x 24 layers x hidden 1024 x mlp 4096: ~0.73 TFLOP per 448 px tile
    layers_only = 24 * (2 * 1025 * (4 * 1024**2 + 2 * 1024 * 4096) + 4 * 1025**2 * 1024)
    assert layers_only == pytest.approx(0.7224e12, rel=1e-3)
    f = bench.vit_flops_per_tile(1024, 24, 4096)
    assert f == pytest.approx(0.73e12, rel=0.05)
    assert f > layers_only  # + patch embedding
    coef = bench.model_flops(config_copy("internvl3-1b"))
    assert coef["vit_per_tile"] == pytest.approx(0.73e12, rel=0.05)
    assert coef["tokens_per_tile"] == 256


def test_lm_params_match_the_published_models():
    # Qwen2.5-0.5B / 1.5B (the LMs of InternVL3-1B / 2B): 0.36B / 1.31B non-embedding params
    one, two = (bench.model_flops(config_copy(p)) for p in ("internvl3-1b", "internvl3-2b"))
    assert one["lm_layer_params"] == pytest.approx(0.36e9, rel=0.02)
    assert two["lm_layer_params"] == pytest.approx(1.31e9, rel=0.02)
    assert one["lm_head_params"] == 896 * 151674
    tiny = bench.model_flops(config_copy("tiny"))
    assert tiny["tokens_per_tile"] == 64  # 224 px tiles


def test_run_flops_adds_vit_prefill_and_decode():
    coef = {"vit_per_tile": 1e9, "tokens_per_tile": 256, "lm_layer_params": 1000,
            "lm_head_params": 100, "lm_hidden": 10, "lm_layers": 2}
    f = bench.run_flops(coef, requests=2, prompt_tokens=2 * 300, image_tokens=2 * 512,
                        output_tokens=2 * 4)
    assert f["tiles"] == 4
    assert f["vit"] == 4e9
    assert f["prefill"] == 2 * 1000 * 600 + 2 * 2 * 2 * 10 * 300**2
    assert f["decode"] == 8 * (2 * 1000 + 2 * 100 + 4 * 2 * 10 * (300 + 2))
    assert f["total"] == f["vit"] + f["prefill"] + f["decode"]


# -- statistics -------------------------------------------------------------------------------

def test_summarize_and_paired_ratios():
    assert bench.summarize([3, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert bench.summarize([4, 1, 2, 3])["median"] == 2.5
    assert bench.summarize([])["median"] is None
    a = [{"r": 125.0}, {"r": 100.0}, {"r": 125.0}]
    b = [{"r": 100.0}, {"r": 80.0}, {"r": 125.0}]
    r = bench.ratio(a, b, "r")
    assert r["per_repeat"] == [1.25, 1.25, 1.0]
    assert (r["median"], r["min"], r["max"]) == (1.25, 1.0, 1.25)
    assert r["of_medians"] == 125.0 / 100.0


def test_gpu_share():
    assert [bench.gpu_share(n, True) for n in (1, 2, 3, 4)] == [0.87, 0.42, 0.27, 0.19]
    assert bench.gpu_share(3, False) == 0.1


# -- writers ----------------------------------------------------------------------------------

def _rep(seconds, requests=100, out=3200, tiles_per_image=1):
    return {"seconds": seconds, "requests": requests, "output_tokens": out,
            "prompt_tokens": requests * (256 * tiles_per_image + 20),
            "image_tokens": requests * 256 * tiles_per_image, "errors": 0}


def fake_doc(cuda: bool = True) -> dict:
    coef = bench.model_flops(config_copy("internvl3-1b"))
    peak = 800.0 if cuda else None
    secs = {"eager": [1.0, 1.25, 0.8], "compiled": [0.8, 1.0, 0.8]}
    reps = {v: [bench.repeat_row(_rep(s), coef if cuda else None, peak, str(k))
                for k, s in enumerate(ss)] for v, ss in secs.items()}
    infos = {"eager": {"init": {"total_s": 61.23}, "cache_hit": True},
             "compiled": {"init": {"total_s": 95.0}, "cache_hit": False}}
    doc = {"schema": 1, "name": "fake-1b", "command": "internvl-batch bench --name fake-1b",
           "config": {"model": "preset:internvl3-1b", "images": 100, "sizes": "448",
                      "max_dynamic_patch": 1, "max_tokens": 32, "repeats": 3,
                      "warmup_images": 64, "notes": []},
           "device": {"name": "NVIDIA H100 80GB HBM3" if cuda else "cpu (x86_64, 2 cores)",
                      "cuda": cuda, "matmul_bf16_tflops": peak},
           "versions": {"vllm": "0.26.0", "torch": "2.11.0", "internvl_batch": "0.1.0",
                        "git_sha": "abc"}}
    doc.update(bench.analyse(reps, infos))
    return doc


def test_results_markdown_exact_cells():
    doc = fake_doc()
    md = report.results_markdown(doc)
    rows = {line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines() if line.startswith("| ")}
    # eager: 100/1.0, 100/1.25, 100/0.8 requests/s -> median 100, 80..125
    assert rows["eager"][1] == "100.0 (80.0–125.0)"
    assert rows["eager"][2] == "3,200.0 (2,560.0–4,000.0)"
    assert rows["eager"][3] == "1.000"
    assert rows["eager"][4] == "1.00"
    assert rows["eager"][6:] == ["n/a", "61.2", "hit"]  # GPU busy: not sampled here
    assert rows["compiled"][1] == "125.0 (100.0–125.0)"
    assert rows["compiled"][8] == "miss"
    roof = doc["variants"]["eager"]["summary"]["roofline_pct"]
    # 100 one-tile images in 1 s: ViT 100 x 0.726 + prefill 2 x 0.358e9 x 27,600 + decode
    # 3,200 x 2 x (0.358e9 + 0.136e9) ~= 95.9 TFLOP over 800 TFLOP/s ~= 12 %
    assert roof["median"] == pytest.approx(11.99, abs=0.05)
    assert rows["eager"][5] == "12.0 (9.6–15.0)"
    # per repeat ratios 1.25, 1.25, 1.0 (same images in repeat k)
    assert rows["compiled/eager"][1] == "1.250 (+25.0 %), per repeat 1.000–1.250"
    assert "bf16 8192³ matmul: 800.0 TFLOP/s" in md
    assert "CPU run" not in md


def test_caption_agreement_against_the_slow_path():
    caps = {"compiled": ["a cat", "a dog", None, "xyz"],
            "plain": ["a cat", "a dot", "a cow", "abc"],
            "eager": ["a cat", "a dog", "a cow", "abc"]}
    got = bench.caption_agreement(caps)
    assert got["reference"] == "plain" and got["images"] == 4
    # the failed row (None) is not compared; "a dog" vs "a dot" shares 4 of 5 characters
    assert got["variants"]["compiled"] == {"compared": 3, "identical": 1,
                                           "identical_pct": 33.33,
                                           "mean_common_prefix_pct": 60.0}
    assert got["variants"]["eager"]["identical"] == 3
    assert bench.caption_agreement({"eager": ["x"]}) == {}
    doc = fake_doc()
    doc["captions"] = dict(got, slice="warmup")
    line = report.captions_line(doc)
    assert line.startswith("Captions (greedy) of the 4 warm-up images, compared with plain's: ")
    assert "compiled 1/3 identical (mean common prefix 60.0 %)" in line
    assert line in report.results_markdown(doc)


def test_gpu_busy_windows_use_nvidia_smi_timestamps():
    b = bench.GpuBusy()
    lines = ["2026/11/24 13:00:00.000, 10", "2026/11/24 13:00:00.100, 20",
             "2026/11/24 13:00:00.200, 90", "2026/11/24 13:00:00.300, 100", "garbage", ""]
    b.samples = [x for x in map(bench.GpuBusy.parse, lines) if x]
    assert len(b.samples) == 4
    t0 = b.samples[0][0]
    assert b.mean(t0 + 0.05, t0 + 0.35) == 70.0  # 20, 90, 100
    assert b.mean(t0, t0 + 0.15) is None  # under 3 samples: no number
    b.stop()  # never started: nothing to stop


def test_roofline_is_na_on_cpu_and_banner_shows():
    doc = fake_doc(cuda=False)
    md = report.results_markdown(doc)
    eager = next(line for line in md.splitlines() if line.startswith("| eager |"))
    assert eager.split(" | ")[5] == "n/a"
    assert report.CPU_BANNER in md


def test_reproduce_writes_markdown_and_small_png(tmp_path):
    gpu, cpu = fake_doc(), fake_doc(cuda=False)
    cpu["name"] = "cpu-tiny"
    files = []
    for d in (gpu, cpu):
        p = tmp_path / f"{d['name']}.json"
        p.write_text(json.dumps(d))
        files.append(p)
    md, png = report.reproduce(files, tmp_path / "out")
    text = md.read_text()
    assert text.splitlines()[2].startswith(f"> {report.CPU_BANNER}")  # at the top
    assert "internvl-batch bench --name fake-1b" in text
    assert "+4.3 % requests/s" in text and "+3.8 % output tok/s" in text
    assert ("fake-1b (NVIDIA H100 80GB HBM3; 1.0 tiles per image, GPU busy n/a during the "
            "eager runs): +25.0 % requests/s (per repeat +0.0 % … +25.0 %)") in text
    assert "![compiled/eager and pipeline/plain ratios per configuration](reproduce.png)" in text
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000

    gpu_only = report.reproduce([files[0]], tmp_path / "gpu")[0].read_text()
    assert report.CPU_BANNER not in gpu_only

    # a hand-written lead above the marker survives regeneration; the rest is rewritten
    out = tmp_path / "gpu" / "REPRODUCE.md"
    out.write_text(f"# Lead\n\nencoder numbers\n\n{report.LEAD_END}\n\nstale tables\n")
    again = report.reproduce([files[0]], tmp_path / "gpu")[0].read_text()
    assert again.startswith("# Lead\n\nencoder numbers\n\n" + report.LEAD_END)
    assert "stale tables" not in again and again.endswith(gpu_only)


def test_report_cli_missing_file(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2


# -- the plain script and the CLI --------------------------------------------------------------

def test_plain_script_uses_the_same_prompt():
    from internvl_batch import prompts
    from internvl_batch.bench.worker import load_plain
    from internvl_batch.config import PromptSpec

    plain = load_plain()
    assert plain.PROMPT == prompts.render(PromptSpec())
    assert callable(plain.run_once) and callable(plain.make_llm)


def _cli(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "internvl_batch", "bench", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def test_bad_variant_is_a_usage_error():
    r = _cli("--variants", "eager,turbo")
    assert r.returncode == 2 and "turbo" in r.stderr


@pytest.mark.cpu_only
def test_compiled_refused_without_gpu(tmp_path):
    r = _cli("--model", "preset:tiny", "--images", "2", "--variants", "eager,compiled",
             "--cache-dir", str(tmp_path), "--results-dir", str(tmp_path / "res"))
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "compiled needs a CUDA GPU" in err[0] and "--cpu-ok" in err[0]
    assert not (tmp_path / "res").exists()


@pytest.mark.cpu_only
def test_pipeline_fp8_refused_without_gpu_or_dropped_with_cpu_ok(tmp_path):
    r = _cli("--model", "preset:tiny", "--images", "2", "--variants", "plain,pipeline-fp8",
             "--cache-dir", str(tmp_path), "--results-dir", str(tmp_path / "res"))
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "variant pipeline-fp8 needs a CUDA GPU" in err[0] and "--cpu-ok" in err[0]
    assert not (tmp_path / "res").exists()
    plan = bench._plan({"variants": ["plain", "compiled", "pipeline-fp8"], "model": "preset:tiny",
                        "cache_dir": str(tmp_path), "max_dynamic_patch": 1, "cpu_ok": True,
                        "pipeline_engine": "auto", "gpu_memory_utilization": None},
                       log=lambda m: None)
    assert plan.variants == ["plain"]
    assert [n.split(" (")[0] for n in plan.notes] == ["dropped variant compiled",
                                                      "dropped variant pipeline-fp8"]


def test_pipeline_fp8_ratios_and_note():
    reps = {v: [bench.repeat_row(_rep(s), None, None, str(k)) for k, s in enumerate(ss)]
            for v, ss in {"plain": [2.0, 2.0], "pipeline": [1.0, 1.0],
                          "pipeline-fp8": [0.8, 0.5]}.items()}
    infos = {v: {"init": {"total_s": 1.0}, "compile": v != "plain"} for v in reps}
    got = bench.analyse(reps, infos)
    assert set(got["ratios"]) == {"pipeline/plain", "pipeline-fp8/pipeline",
                                  "pipeline-fp8/plain"}
    assert got["ratios"]["pipeline-fp8/pipeline"]["requests_per_s"]["per_repeat"] == [1.25, 2.0]
    doc = fake_doc()
    doc["variants"]["pipeline-fp8"] = doc["variants"]["compiled"]
    assert "- pipeline-fp8: vLLM's online FP8" in report.results_markdown(doc)
    assert "pipeline-fp8" not in report.results_markdown(fake_doc())


# -- real vLLM on CPU -------------------------------------------------------------------------

@pytest.mark.vllm
def test_bench_cpu_end_to_end(tmp_path):
    from tests.conftest import HAS_VLLM

    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (scripts/install-cpu.sh)")
    res = tmp_path / "results"
    r = _cli("--model", "preset:tiny", "--images", "8", "--variants", "eager,plain,pipeline",
             "--repeats", "1", "--warmup-images", "1", "--max-tokens", "8", "--cpu-ok",
             "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(res),
             "--name", "t", timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((res / "t.json").read_text())
    assert list(doc["variants"]) == ["eager", "plain", "pipeline"]
    for v, d in doc["variants"].items():
        (rep,) = d["repeats"]
        assert rep["requests"] == 8 and rep["errors"] == 0, v
        assert rep["output_tokens"] == 8 * 8, v  # ignore_eos: exactly max_tokens each
        assert rep["image_tokens"] % 64 == 0 and rep["tiles_per_image"] >= 1, v
        assert rep["requests_per_s"] == pytest.approx(8 / rep["seconds"]), v
        assert d["summary"]["requests_per_s"]["median"] == rep["requests_per_s"]
    # both variants saw the same images
    assert doc["variants"]["eager"]["repeats"][0]["image_tokens"] == \
        doc["variants"]["plain"]["repeats"][0]["image_tokens"]
    # eager and pipeline share one cache entry and start side by side: the cache's lock lets
    # exactly one of them build it (which one is a race), the other finds it
    v = doc["variants"]
    assert v["eager"]["cache_key"] == v["pipeline"]["cache_key"]
    assert sorted([v["eager"]["cache_hit"], v["pipeline"]["cache_hit"]]) == [False, True]
    assert doc["device"]["cuda"] is False and doc["device"]["matmul_bf16_tflops"] is None
    assert doc["versions"]["vllm"] and doc["command"].startswith("internvl-batch bench")
    md = (res / "t.md").read_text()
    assert "| eager |" in md and "| plain |" in md and report.CPU_BANNER in md
    assert "| eager |" in r.stdout  # the table is printed at the end
    # the one warm-up image: our engine and the run path say exactly what the plain script says
    assert doc["captions"]["reference"] == "plain" and doc["captions"]["slice"] == "warmup"
    for v in ("eager", "pipeline"):
        assert doc["captions"]["variants"][v]["compared"] == 1, v
        assert doc["captions"]["variants"][v]["identical"] == 1, v
    assert "Captions (greedy) of the 1 warm-up images, compared with plain's" in md
