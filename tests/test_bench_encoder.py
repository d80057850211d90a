"""Encoder micro-benchmark (`internvl-batch bench-encoder`): statistics, tolerance,
weight re-initialisation and reports as fast unit tests; one real CPU vLLM run (eager only:
vLLM's compiled InternVL encoder fails on CPU) through the CLI in a subprocess."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from internvl_batch.bench import encoder as enc
from internvl_batch.bench.common import Recorder, median_ci
from internvl_batch.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "internvl_batch", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# -- parsing and options -------------------------------------------------------------------------

def test_parse_ints_and_modes():
    assert enc.parse_ints("1, 2,2,4", "--batches") == (1, 2, 4)
    assert enc.parse_ints("", "--profile-batches") == ()
    for bad in ("a", "0", "1,-2"):
        with pytest.raises(ConfigError, match="--batches"):
            enc.parse_ints(bad, "--batches")
    assert enc.parse_modes("auto") is None
    assert enc.parse_modes("cudagraph,eager,cudagraph") == ("cudagraph", "eager")
    with pytest.raises(ConfigError, match="choose from"):
        enc.parse_modes("fast")


def test_resolve_modes_puts_eager_first_and_refuses_compiled_on_cpu():
    assert enc.resolve_modes(None, cuda=True) == ("eager", "compiled", "cudagraph")
    assert enc.resolve_modes(None, cuda=False) == ("eager",)
    assert enc.resolve_modes(("cudagraph",), cuda=True) == ("eager", "cudagraph")
    with pytest.raises(ConfigError, match="needs a CUDA GPU") as e:
        enc.resolve_modes(("compiled",), cuda=False)
    assert "\n" not in str(e.value)


def test_options_validation():
    enc.EncoderBenchOptions()
    for bad in (dict(batches=()), dict(batches=(0,)), dict(repeats=0), dict(warmup=-1),
                dict(cudagraph_budgets="pow2"), dict(modes=("eager", "x")),
                dict(layer_scale=0.0)):
        with pytest.raises(ConfigError):
            enc.EncoderBenchOptions(**bad)


def test_item_layout_and_cudagraph_budgets():
    assert enc.item_layout(32) == [13, 13, 6]
    assert enc.item_layout(13) == [13] and enc.item_layout(1) == [1]
    assert all(sum(enc.item_layout(t)) == t and max(enc.item_layout(t)) <= 13
               for t in range(1, 200))
    s = enc.cudagraph_settings((4, 1, 128, 13), 256, "exact")
    assert s["encoder_cudagraph_token_budgets"] == [256, 1024, 3328, 32768]
    # vLLM 0.26 requires max items per graph <= the smallest budget
    assert s["encoder_cudagraph_max_vision_items_per_batch"] == 128 <= 256
    assert enc.cudagraph_settings((1, 2), 256, "auto") == {"cudagraph_mm_encoder": True}


def test_tolerance_follows_bf16_and_depth():
    t24, t45 = enc.tolerance(24), enc.tolerance(45)
    assert t24["rel_l2_max"] == pytest.approx(2 ** -9 * 4 * math.sqrt(24), abs=1e-4)
    assert t24["rel_l2_max"] < t45["rel_l2_max"] < 0.06
    assert t24["cos_min"] == pytest.approx(1 - t24["rel_l2_max"] ** 2 / 2, abs=1e-5)


# -- numerics ------------------------------------------------------------------------------------

def test_agreement_measures_and_judges():
    import torch

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(512, 64, generator=g).to(torch.bfloat16)
    tol = enc.tolerance(24)
    same = enc.agreement(ref, ref.clone(), tol)
    assert same["max_abs_diff"] == 0 and same["rel_l2"] == 0 and same["ok"]
    assert same["cos"] == pytest.approx(1.0, abs=1e-6)
    close = enc.agreement(ref, (ref.float() * (1 + 0.004 * torch.randn(512, 64, generator=g)))
                          .to(torch.bfloat16), tol)
    assert close["ok"] and 0 < close["rel_l2"] < tol["rel_l2_max"]
    wrong = enc.agreement(ref, torch.randn(512, 64, generator=g).to(torch.bfloat16), tol)
    assert not wrong["ok"] and wrong["cos"] < 0.5
    assert not enc.agreement(ref, ref[:10], tol)["ok"]
    nan = ref.clone().float()
    nan[0, 0] = float("nan")
    assert not enc.agreement(ref, nan, tol)["ok"]


def test_token_spread_tells_degenerate_from_varied():
    import torch

    g = torch.Generator().manual_seed(1)
    flat = torch.ones(256, 32) + 1e-4 * torch.randn(256, 32, generator=g)
    varied = torch.randn(256, 32, generator=g)
    assert enc.token_spread(flat, 256)["mean_token_cos"] > 0.99
    assert abs(enc.token_spread(varied, 256)["mean_token_cos"]) < 0.1




def _fake_internvl():
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.full((d,), 0.5, dtype=torch.bfloat16))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(16).to(torch.bfloat16)
            self.q_norm = RMSNorm(16)
            self.qkv = nn.Linear(16, 48).to(torch.bfloat16)
            self.ls1 = nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
            self.ls2 = nn.Parameter(torch.ones(16, dtype=torch.bfloat16))

    class Vision(nn.Module):
        def __init__(self):
            super().__init__()
            self.class_embedding = nn.Parameter(torch.zeros(1, 1, 16, dtype=torch.bfloat16))
            self.layers = nn.ModuleList([Layer(), Layer()])

    m = nn.Module()
    m.vision_model = Vision()
    m.mlp1 = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32, bias=True)).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1e-3, 1e-3)  # what load_format=dummy leaves
    return m


def test_reinit_vision_gives_trained_like_scales_in_place():
    import torch

    m = _fake_internvl()
    qkv = m.vision_model.layers[0].qkv.weight
    storage = qkv.data_ptr()
    info = enc.reinit_vision_(m, seed=3, std=0.02, layer_scale=0.1)
    layer = m.vision_model.layers[1]
    assert qkv.data_ptr() == storage and qkv.dtype == torch.bfloat16  # same storage
    assert float(qkv.detach().float().std()) == pytest.approx(0.02, rel=0.25)
    assert torch.all(layer.ls1 == 0.1) and torch.all(layer.ls2 == 0.1)
    assert torch.all(layer.norm1.weight == 1) and torch.all(layer.norm1.bias == 0)
    assert torch.all(layer.q_norm.weight == 1)
    assert torch.all(layer.qkv.bias == 0)
    assert float(m.vision_model.class_embedding.detach().float().abs().max()) > 0.01
    assert torch.all(m.mlp1[0].weight == 1) and float(m.mlp1[1].weight.detach().float().std()) > 0.01
    assert info["total"] == sum(p.numel() for p in m.parameters())
    again = _fake_internvl()
    enc.reinit_vision_(again, seed=3)
    assert torch.equal(again.vision_model.layers[0].qkv.weight, qkv)  # fixed seed


# -- evidence helpers ----------------------------------------------------------------------------

def test_counter_delta_keeps_nonzero_changes_only():
    a = {"stats": {"unique_graphs": 2}, "graph_break": {}, "n": 1}
    b = {"stats": {"unique_graphs": 2, "calls_captured": 5}, "graph_break": {"x": 1}, "n": 1}
    assert enc.counter_delta(a, b) == {"stats": {"calls_captured": 5}, "graph_break": {"x": 1}}
    assert enc.counter_delta(a, a) == {}


@pytest.mark.parametrize("name, kind", [
    ("triton_poi_fused_add_mul_native_layer_norm_0", "inductor"),
    ("void flash::FlashAttnFwdSm90<cutlass::bfloat16_t>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7", "attention"),
    ("nvjet_tst_192x192_64x4_1x2_h_bz_coopB_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ("Memcpy DtoD (Device -> Device)", "memcpy"),
])
def test_kernel_category(name, kind):
    assert enc.kernel_category(name) == kind


def test_kernel_rows_count_device_events_only():
    from torch.autograd import DeviceType

    ev = [SimpleNamespace(name="nvjet_a", device_type=DeviceType.CUDA, device_time_total=30.0),
          SimpleNamespace(name="nvjet_a", device_type=DeviceType.CUDA, device_time_total=10.0),
          SimpleNamespace(name="triton_poi_fused_0", device_type=DeviceType.CUDA,
                          device_time_total=10.0),
          SimpleNamespace(name="cudaLaunchKernel", device_type=DeviceType.CPU,
                          device_time_total=40.0)]
    rows = sorted(enc.kernel_rows(ev))
    assert rows == [("nvjet_a", 2, 40.0), ("triton_poi_fused_0", 1, 10.0)]
    b = enc.kernel_breakdown(rows)
    assert b["kernels"] == 3 and b["device_ms"] == pytest.approx(0.05)
    assert b["categories"]["gemm"]["share"] == pytest.approx(0.8)
    assert b["top"][0]["name"] == "nvjet_a"


# -- reports -------------------------------------------------------------------------------------

def _mode(ms, speedup=None):
    st = median_ci(ms)
    out = {"ms": st, "samples_ms": ms, "tiles_per_s": 1000 / st["median"]}
    if speedup:
        out["speedup_vs_eager"] = median_ci(speedup)
    return out


def _gpu_doc(name="encoder-internvl3-1b", speed=1.25):
    tol = enc.tolerance(24)
    good = {"max_abs_diff": 0.0156, "ref_max_abs": 2.1, "rel_l2": 0.004, "cos": 0.99999,
            "cos_min_token": 0.9998, "finite": True, "ok": True}
    bad = dict(good, rel_l2=0.5, cos=0.7, ok=False)
    batches = []
    for tiles, ag in ((1, good), (13, bad)):
        batches.append({"tiles": tiles, "items": enc.item_layout(tiles), "agreement": {
            "eager_repeat": {"max_abs_diff": 0.0}, "compiled": ag, "cudagraph": good},
            "modes": {"eager": _mode([2.0] * 7),
                      "compiled": _mode([2.0 / speed] * 7, [speed] * 7),
                      "cudagraph": {"error": "RuntimeError: boom"} if tiles == 13 else
                      _mode([1.0] * 7, [2.0] * 7)}})
    return {"name": name, "complete": True, "modes": list(enc.MODES),
            "modes_run": list(enc.MODES), "labels": enc.LABELS, "total_s": 100,
            "model": {"spec": "preset:internvl3-1b", "vision": {
                "hidden": 1024, "layers": 24, "heads": 16, "mlp": 4096,
                "norm_type": "layer_norm", "qk_normalization": False}},
            "device": {"name": "NVIDIA H100 80GB HBM3", "cuda": True},
            "versions": {"vllm": "0.26.0", "torch": "2.11.0", "git": "abc"},
            "engine": {"init_s": 70.0, "cudagraph_manager": {
                "token_budgets": [256, 3328], "max_batch_size": 13}},
            "options": {"repeats": 7, "warmup": 2, "init_std": 0.02, "layer_scale": 0.1,
                        "seed": 0, "cudagraph_budgets": "exact"},
            "tolerance": tol, "batches": batches,
            "evidence": {"layers_after_start": {"layers": 24, "aot_compiled_fn": 24,
                                                "aot_loaded_from_disk": 23},
                         "calls": [{"mode": "compiled", "tiles": 1,
                                    "layer_paths": {"compiled (AOT)": 24}, "layer_calls": 24,
                                    "dynamo_delta": {}},
                                   {"mode": "cudagraph", "tiles": 1, "layer_paths": {},
                                    "layer_calls": 0, "dynamo_delta": {}, "graph_hits": 1,
                                    "graph_misses": 0}],
                         "during_timing": {"dynamo_delta": {}, "vllm_counter_delta": {},
                                           "graph_hits": 7, "graph_misses": 0},
                         "kernels": [{"mode": "eager", "tiles": 1, "kernels": 300,
                                      "device_ms": 1.9, "categories": {
                                          "gemm": {"kernels": 96, "ms": 1.2, "share": 0.63}}}]},
            "degeneracy": {"dummy_weights": {"mean_token_cos": 1.0, "std": 0.0005},
                           "reinit_weights": {"mean_token_cos": 0.04, "std": 0.4}},
            "errors": [{"where": "cudagraph 13 tiles (first call)",
                        "error": "RuntimeError: boom"}],
            "command": "internvl-batch bench-encoder --model preset:internvl3-1b"}


def test_results_markdown_tables_and_evidence():
    md = enc.results_markdown(_gpu_doc())
    assert "| tiles | eager ms | compiled ms | cudagraph ms | compiled speed-up |" in md
    assert "**1.250×** (1.250–1.250)" in md and "**2.000×**" in md
    assert "| 13 |" in md and "error" in md and "**NO**" in md  # failed agreement shown
    assert "compiled (AOT): 24" in md and "none (no Python-level layer call)" in md
    assert "cudagraph 13 tiles (first call): RuntimeError: boom" in md
    assert "CPU run" not in md
    assert "dummy weights 1.0000" in md


def test_plot_report_and_missing_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_gpu_doc()))
    b.write_text(json.dumps(_gpu_doc("encoder-internvit-6b", 1.1)))
    r = enc.write_report([a, b, tmp_path / "missing.json"], tmp_path / "out")
    assert r["docs"] == 2 and r["png"].stat().st_size > 10_000
    text = r["md"].read_text()
    assert "encoder-internvit-6b" in text and "![speed-up vs tile batch](encoder.png)" in text
    outs = enc.write_outputs(_gpu_doc(), tmp_path / "single")
    assert set(outs) == {"json", "md", "png"}
    assert json.loads(outs["json"].read_text())["name"] == "encoder-internvl3-1b"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails
    assert enc.plot([_gpu_doc()], tmp_path / "none.png") is None
    assert "png" not in enc.write_outputs(_gpu_doc("x"), tmp_path / "nopng")


def test_report_module_entry_point(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_gpu_doc()))
    assert enc.main(["report", str(tmp_path / "o"), str(a)]) == 0
    assert (tmp_path / "o" / "ENCODER.md").is_file()
    assert enc.main(["nonsense"]) == 2


def test_internvit_6b_preset_mirrors_the_38b_encoder():
    from internvl_batch import checkpoint

    v = checkpoint.config_copy("internvit-6b")["vision_config"]
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
            v["intermediate_size"]) == (3200, 45, 25, 12800)
    assert v["norm_type"] == "rms_norm" and v["qk_normalization"] and not v["qkv_bias"]
    assert v["initializer_factor"] == 0.1
    lm = checkpoint.config_copy("internvit-6b")["llm_config"]
    assert lm["hidden_size"] == 896  # the smallest LM: Qwen2-0.5B shapes
    one = checkpoint.config_copy("internvl3-1b")["vision_config"]  # unchanged by the new fields
    assert (one["norm_type"], one["qk_normalization"], one["qkv_bias"],
            one["initializer_factor"]) == ("layer_norm", False, True, 1.0)


def test_cli_help_lists_the_command():
    from click.testing import CliRunner

    from internvl_batch.cli import cli

    res = CliRunner().invoke(cli, ["--help"])
    assert "bench-encoder" in res.output
    res = CliRunner().invoke(cli, ["bench-encoder", "--help"])
    assert res.exit_code == 0 and "--cudagraph-budgets" in res.output


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    res = _cli("bench-encoder", "--batches", "1,zero", "--results-dir", str(tmp_path),
               timeout=120)
    assert res.returncode == 2
    assert "--batches: 'zero' is not an integer" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.cpu_only
def test_cli_compiled_mode_on_cpu_is_a_user_error(tmp_path):
    pytest.importorskip("torch")
    res = _cli("bench-encoder", "--model", "preset:tiny", "--modes", "compiled",
               "--cache-dir", str(tmp_path / "c"), "--results-dir", str(tmp_path), timeout=300)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1] == ("Error: --modes compiled needs a CUDA GPU: on CPU vLLM's compiled "
                         "InternVL encoder fails ('Inference tensors cannot be saved for "
                         "backward') and encoder CUDA graphs do not exist; use --modes eager")
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.glob("*.json"))  # refused before any engine or result file


# -- the measuring logic with every mode, on a fake harness -------------------------------------

class FakeHarness:
    """The interface `encoder._measure` uses, on a small torch model: `compiled` adds a
    bf16-sized perturbation, `cudagraph` returns the same as compiled, and `cudagraph` fails
    at 4 tiles (as an out-of-memory would) to exercise the per-(mode, batch) error path."""

    cuda = False
    tokens_per_tile = 4

    def __init__(self, torch_mod):
        from contextlib import contextmanager
        from collections import Counter

        torch = torch_mod
        self.torch = torch
        self.model = _fake_internvl()
        self.model.config = SimpleNamespace(
            force_image_size=448, text_config=SimpleNamespace(hidden_size=32),
            vision_config=SimpleNamespace(hidden_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=64,
                                          image_size=448, patch_size=14))
        self.runner = SimpleNamespace(vllm_config=SimpleNamespace(
            compilation_config=SimpleNamespace(compile_mm_encoder=True)))
        self.hits = 0
        self.paths = Counter()
        self._Counter, self._cm = Counter, contextmanager

    def modes_available(self):
        return {"eager": None, "compiled": None, "cudagraph": None}

    def layer_state(self):
        return {"layers": 2, "aot_compiled_fn": 2}

    def manager_stats(self):
        return {"graph_hits": self.hits, "graph_misses": 0, "token_budgets": [4, 8]}

    def inputs(self, tiles, seed):
        g = self.torch.Generator().manual_seed(seed)
        return {"x": self.torch.randn(tiles * self.tokens_per_tile, 64, generator=g)}

    def call(self, mode, kw):
        if mode == "cudagraph" and kw["x"].shape[0] == 4 * self.tokens_per_tile:
            raise RuntimeError("CUDA out of memory (fake)")
        w = self.model.mlp1[1].weight.detach().float()
        y = kw["x"] @ w.T
        if mode == "cudagraph":
            self.hits += 1
        else:
            self.paths["eager" if mode == "eager" else "compiled (AOT)"] += 2
        if mode != "eager":  # same math, other rounding: ~1e-3 relative
            y = (y.to(self.torch.bfloat16).float() * (1 + 1e-3))
        return [y.to(self.torch.bfloat16)]

    def cat(self, outs):
        return self.torch.cat(outs)

    def sync(self):
        pass

    def timed_ms(self, mode, kw):
        self.call(mode, kw)
        return {"eager": 2.0, "compiled": 1.6, "cudagraph": 1.0}[mode] * kw["x"].shape[0] / 4

    def count_layer_paths(self):
        outer = self

        @self._cm
        def cm():
            before = outer._Counter(outer.paths)
            tally = outer._Counter()
            yield tally
            tally.update(outer.paths - before)
        return cm()

    def profile(self, mode, kw):  # GPU only; never called with cuda False
        raise AssertionError


def test_measure_with_all_modes_on_a_fake_harness(tmp_path):
    import torch

    opts = enc.EncoderBenchOptions(batches=(1, 2, 4), repeats=6, warmup=1,
                                   evidence_batches=(1, 13), profile_batches=(1,),
                                   results_dir=str(tmp_path), name="fake")
    doc = {"name": "fake", "complete": False, "modes": list(enc.MODES), "labels": enc.LABELS,
           "model": {"spec": "fake"}, "engine": {}, "device": {"name": "fake", "cuda": False},
           "versions": {}, "degeneracy": {}, "evidence": {}, "batches": [], "errors": [],
           "options": {}}
    rec = Recorder(doc, tmp_path)
    h = FakeHarness(torch)
    enc._measure(h, opts, enc.MODES, rec, lambda m: None)
    saved = json.loads((tmp_path / "fake.json").read_text())
    assert [b["tiles"] for b in saved["batches"]] == [1, 2, 4]
    b1, b4 = saved["batches"][0], saved["batches"][2]
    assert b1["modes"]["compiled"]["speedup_vs_eager"]["median"] == pytest.approx(1.25)
    assert b1["modes"]["cudagraph"]["speedup_vs_eager"]["median"] == pytest.approx(2.0)
    assert b1["modes"]["cudagraph"]["speedup_vs_eager"]["n"] == 6
    assert b1["agreement"]["compiled"]["ok"] and b1["agreement"]["cudagraph"]["ok"]
    assert b1["agreement"]["eager_repeat"]["max_abs_diff"] == 0
    # the failing (mode, batch) is recorded, the others at that batch still measured
    assert "out of memory" in b4["modes"]["cudagraph"]["error"]
    assert b4["modes"]["compiled"]["ms"]["n"] == 6
    assert any("cudagraph 4 tiles" in e["where"] for e in saved["errors"])
    calls = {(c["mode"], c["tiles"]): c for c in saved["evidence"]["calls"]}
    assert calls[("compiled", 1)]["layer_paths"] == {"compiled (AOT)": 2}
    assert calls[("cudagraph", 13)]["layer_calls"] == 0 and calls[("cudagraph", 13)]["graph_hits"] == 1
    assert saved["evidence"]["first_compiled_call"]["tiles"] == 13
    assert saved["evidence"]["during_timing"]["graph_hits"] > 0
    assert saved["weights"]["layer_scale"] == 0.1
    assert saved["tolerance"]["layers"] == 2
    md = enc.results_markdown(saved)
    assert "| 4 |" in md and "error" in md and "compiled (AOT): 2" in md


# -- a real engine ---------------------------------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_bench_encoder_on_cpu_vllm(tmp_path, cache_root):
    # +dummy: the weights vLLM fills in itself, which the re-initialisation exists to replace
    res = _cli("bench-encoder", "--model", "preset:tiny+dummy", "--batches", "1,2,4",
               "--repeats", "3", "--warmup", "1", "--modes", "eager", "--cache-dir", str(cache_root),
               "--results-dir", str(tmp_path), "--name", "cpu-encoder")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "cpu-encoder.json").read_text())
    assert doc["complete"] and doc["modes_run"] == ["eager"] and not doc["errors"]
    assert doc["model"]["vision"]["layers"] == 2 and doc["model"]["tokens_per_tile"] == 64
    assert [b["tiles"] for b in doc["batches"]] == [1, 2, 4]
    for b in doc["batches"]:
        e = b["modes"]["eager"]
        assert len(e["samples_ms"]) == 3 and e["ms"]["n"] == 3
        assert all(math.isfinite(x) and x > 0 for x in e["samples_ms"])
        assert e["ms"]["lo"] <= e["ms"]["median"] <= e["ms"]["hi"]
        assert e["tiles_per_s"] == pytest.approx(b["tiles"] * 1000 / e["ms"]["median"])
        rerun = b["agreement"]["eager_repeat"]  # eager against itself: bit for bit
        assert rerun["max_abs_diff"] == 0 and rerun["cos"] == pytest.approx(1.0, abs=1e-6)
        assert rerun["finite"]
    # the re-initialised encoder is no longer degenerate
    deg = doc["degeneracy"]
    assert deg["dummy_weights"]["mean_token_cos"] > 0.99
    assert deg["reinit_weights"]["mean_token_cos"] < 0.5
    assert doc["weights"]["total"] > 0 and doc["weights"]["seed"] == 0
    # every encoder-layer call took the plain forward; nothing was compiled while measuring
    assert {c["tiles"] for c in doc["evidence"]["calls"]} == {1, 13}
    assert all(c["layer_paths"] == {"eager": 2} for c in doc["evidence"]["calls"])
    assert not doc["evidence"]["during_timing"]["dynamo_delta"]
    md = (tmp_path / "cpu-encoder.md").read_text()
    assert "CPU run" in md and "| 4 |" in md
    assert (tmp_path / "cpu-encoder.png").stat().st_size > 5_000


# -- which model runner ran (vLLM 0.26: only the V1 runner has encoder CUDA graphs) ------------

def _runner_of_module(module: str):
    cls = type("GPUModelRunner", (), {"__module__": module})
    r = cls()
    r.vllm_config = SimpleNamespace(use_v2_model_runner=module.startswith("vllm.v1.worker.gpu."))
    return r


def test_model_runner_info_and_why_cudagraph_is_unavailable():
    v2 = enc.model_runner_info(_runner_of_module("vllm.v1.worker.gpu.model_runner"), False,
                               env={})
    assert v2["runner"] == "V2" and v2["VLLM_USE_V2_MODEL_RUNNER"] is None
    assert v2["use_v2_model_runner"] is True and v2["encoder_cudagraph_manager"] is False
    why = enc.cudagraph_unavailable_reason(v2)
    assert "V2 model runner" in why and "VLLM_USE_V2_MODEL_RUNNER=0" in why
    assert "ignores cudagraph_mm_encoder" in why
    v1 = enc.model_runner_info(_runner_of_module("vllm.v1.worker.gpu_model_runner"), True,
                               env={"VLLM_USE_V2_MODEL_RUNNER": "0"})
    assert v1["runner"] == "V1" and v1["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert v1["encoder_cudagraph_manager"] is True
    other = enc.model_runner_info(_runner_of_module("vllm.v1.worker.cpu_model_runner"), False,
                                  env={})
    assert other["runner"].startswith("other") and \
        "VLLM_USE_V2_MODEL_RUNNER=0" in enc.cudagraph_unavailable_reason(other)


def test_model_runner_of_old_results_and_report_line():
    recorded = _gpu_doc()
    recorded["engine"] = {"model_runner": {"runner": "V1", "class": "x.GPUModelRunner",
                                           "VLLM_USE_V2_MODEL_RUNNER": "0",
                                           "encoder_cudagraph_manager": True,
                                           "source": "recorded"}}
    assert enc.model_runner_of(recorded)["runner"] == "V1"
    md = enc.results_markdown(recorded)
    assert "vLLM model runner: **V1 runner**" in md and "VLLM_USE_V2_MODEL_RUNNER=0" in md
    # a file from before the runner was recorded: the V2 runner's error gives it away
    old_v2 = _gpu_doc()
    old_v2["errors"] = [{"where": "mode cudagraph", "error": "no encoder CUDA graph manager "
                         "in the model runner (cudagraph_mm_encoder off)"}]
    got = enc.model_runner_of(old_v2)
    assert got["runner"] == "V2" and "derived" in got["source"]
    assert "**V2 runner**" in enc.results_markdown(old_v2)
    old_v1 = _gpu_doc()  # graph hits during timing: the V1 runner's manager existed
    assert enc.model_runner_of(old_v1)["runner"] == "V1"
    cpu = dict(_gpu_doc(), device={"name": "cpu", "cuda": False})
    assert enc.model_runner_of(cpu) is None


def test_committed_h100_results_name_their_runner():
    root = Path(__file__).resolve().parents[1] / "results" / "h100" / "encoder-alone"
    files = sorted(root.glob("encoder-*.json"))
    assert files, f"no committed encoder results in {root}"
    for f in files:
        d = json.loads(f.read_text())
        want = "V1" if f.stem.endswith("-v1runner") else "V2"
        assert enc.model_runner_of(d)["runner"] == want, f.name
        assert ("cudagraph" in d["modes_run"]) == (want == "V1"), f.name
