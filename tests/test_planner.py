"""Engines over devices: the planner (sizing.plan_engines) for every preset on the GPUs people
run them on, the one-line refusals, the parallel sizes reaching vLLM, the compile-cache key
and the Slurm jobs. No vLLM; the device facts are given, as a machine would report them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from internvl_batch import cache as cache_mod
from internvl_batch import engine as engine_mod
from internvl_batch import sizing
from internvl_batch.checkpoint import PRESETS, synthesize
from internvl_batch.cli import cli
from internvl_batch.config import ConfigError, EngineSpec
from internvl_batch.sizing import Devices, cpu_bind, place, plan_engines

# nominal sizes, as the cards are sold (nvidia-smi reports a little more: 85.5 GB for an H100)
MACHINES = {"1x80": Devices(gpus=1, memory_gb=80, cpus=16),
            "1x141": Devices(gpus=1, memory_gb=141, cpus=16),
            "2x80": Devices(gpus=2, memory_gb=80, cpus=32),
            "8x80": Devices(gpus=8, memory_gb=80, cpus=128)}

# (preset, machine, tensor-parallel size) -> (engines, GPUs per engine, engines per GPU), or
# the start of the refusal
NEEDS_TP2 = "InternVL3-38B needs ~77 GB of weights: pass --tensor-parallel-size 2"
NEEDS_TP4 = "InternVL3-78B needs ~157 GB of weights"
TABLE = {
    ("internvl3-1b", "1x80", 1): (4, 1, 4), ("internvl3-1b", "1x141", 1): (4, 1, 4),
    ("internvl3-1b", "2x80", 1): (8, 1, 4), ("internvl3-1b", "8x80", 1): (16, 1, 2),
    ("internvl3-2b", "1x80", 1): (4, 1, 4), ("internvl3-2b", "8x80", 4): (2, 4, 1),
    ("internvl3-8b", "1x80", 1): (2, 1, 2), ("internvl3-8b", "1x141", 1): (4, 1, 4),
    ("internvl3-8b", "2x80", 1): (4, 1, 2), ("internvl3-8b", "2x80", 2): (1, 2, 1),
    ("internvl3-8b", "8x80", 1): (16, 1, 2),
    ("internvl3-14b", "1x80", 1): (1, 1, 1), ("internvl3-14b", "1x141", 1): (3, 1, 3),
    ("internvl3-14b", "2x80", 1): (2, 1, 1), ("internvl3-14b", "8x80", 1): (8, 1, 1),
    ("internvl3-14b", "8x80", 2): (4, 2, 1),
    ("internvl3-38b", "1x80", 1): NEEDS_TP2 + " on a machine with 2 such GPUs (1 visible here)",
    ("internvl3-38b", "1x141", 1): (1, 1, 1),
    ("internvl3-38b", "2x80", 1): NEEDS_TP2 + " or use a GPU with more memory",
    ("internvl3-38b", "2x80", 2): (1, 2, 1),
    ("internvl3-38b", "8x80", 1): NEEDS_TP2, ("internvl3-38b", "8x80", 2): (4, 2, 1),
    ("internvl3-38b", "8x80", 4): (2, 4, 1),
    ("internvl3-78b", "1x80", 1): NEEDS_TP4 + ": pass --tensor-parallel-size 4 on a machine",
    ("internvl3-78b", "1x141", 1): NEEDS_TP4 + ": pass --tensor-parallel-size 2 on a machine",
    ("internvl3-78b", "2x80", 2): NEEDS_TP4 + ", ~80 GB on each of its 2 GPUs: pass "
                                              "--tensor-parallel-size 4 on a machine with 4",
    ("internvl3-78b", "8x80", 1): NEEDS_TP4 + ": pass --tensor-parallel-size 4 or use",
    ("internvl3-78b", "8x80", 4): (2, 4, 1), ("internvl3-78b", "8x80", 8): (1, 8, 1),
    ("internvit-6b", "1x80", 1): (3, 1, 3), ("internvit-6b", "2x80", 2): (1, 2, 1),
    ("tiny", "1x80", 1): (4, 1, 4), ("tiny", "8x80", 2): (4, 2, 1),
}


def _size(preset: str) -> sizing.ModelSize:
    return sizing.model_size(f"preset:{preset}")


@pytest.mark.parametrize("key", sorted(TABLE))
def test_the_planner_table(key):
    preset, machine, tp = key
    layout = plan_engines(_size(preset), MACHINES[machine], tp=tp)
    want = TABLE[key]
    if isinstance(want, str):
        assert layout.refusal and layout.refusal.startswith(want), layout.refusal
        assert "\n" not in layout.refusal
    else:
        assert layout.refusal is None, layout.refusal
        assert (layout.engines, layout.gpus_per_engine, layout.engines_per_gpu) == want
        assert len(layout.devices) == layout.engines


def test_every_preset_on_every_machine_plans_or_refuses_in_one_line():
    for preset in PRESETS:
        for dev in MACHINES.values():
            for tp in (1, 2, 4, 8):
                layout = plan_engines(_size(preset), dev, tp=tp)
                if layout.refusal:
                    assert "\n" not in layout.refusal and layout.engines == 1
                    continue
                # each engine's share fits 90 % of a GPU, and the groups do not overlap
                assert layout.gpus_per_engine == tp <= dev.gpus
                assert layout.engines * tp <= dev.gpus * layout.engines_per_gpu
                groups = {d for d in layout.devices if d is not None}
                assert all(len(g.split(",")) == tp for g in groups)
                assert len({i for g in groups for i in g.split(",")}) == len(groups) * tp


def test_the_weights_are_the_published_models():
    """Parameter counts from the presets' shapes against the published sizes (bf16: 2 bytes
    a parameter): InternVL3-14B 15.1B, 38B 38.4B, 78B 78.4B."""
    for preset, params_b in (("internvl3-14b", 15.1), ("internvl3-38b", 38.4),
                             ("internvl3-78b", 78.4)):
        assert _size(preset).weights_gb / 2 == pytest.approx(params_b, rel=0.01), preset


def test_refusals_for_the_sizes_themselves():
    tiny, big = _size("tiny"), _size("internvl3-38b")
    assert plan_engines(big, MACHINES["1x80"], tp=2).refusal == (
        "--tensor-parallel-size 2 needs 2 GPUs per engine; 1 visible: request 2 (Slurm: "
        "--gres=gpu:2) or pass smaller sizes")
    assert plan_engines(big, MACHINES["8x80"], tp=3).refusal == (
        "--tensor-parallel-size 3: InternVL3-38B's 40 attention heads (8 KV heads) do not "
        "split 3 ways; use one of 1, 2, 4, 8")
    assert plan_engines(tiny, MACHINES["8x80"], pp=3).refusal == (
        "--pipeline-parallel-size 3: tiny (CPU tests) has only 2 language-model layers")
    assert plan_engines(big, MACHINES["8x80"], tp=2, pp=2).engines == 2


def test_on_cpu_the_ranks_need_cpus_and_the_weights_ram():
    host = Devices(gpus=0, memory_gb=25, cpus=2)
    ok = plan_engines(_size("tiny"), host, tp=2)
    assert (ok.refusal, ok.engines, ok.gpus_per_engine) == (None, 1, 2)
    assert plan_engines(_size("tiny"), Devices(0, 25, 1), tp=2).refusal == \
        "tensor x pipeline parallel size 2 on CPU needs a CPU per rank: 1 usable here"
    assert plan_engines(_size("internvl3-78b"), host).refusal == \
        "InternVL3-78B needs ~157 GB of weights: this host has 25 GB of memory; run it on GPUs"


def test_engines_go_to_disjoint_groups_of_gpus():
    ids = ("3", "5", "6", "7")
    assert place(2, 2, ids) == (("3,5", "6,7"), 1)
    assert place(4, 1, ids) == (("3", "5", "6", "7"), 1)
    assert place(6, 1, ids) == (("3", "5", "6", "7", "3", "5"), 2)
    assert place(3, 2, ids) == (("3,5", "6,7", "3,5"), 2)
    # one group: the engines keep the process's devices
    assert place(4, 1, ("0",)) == ((None,) * 4, 4)
    assert place(1, 4, ids) == ((None,), 1)


def test_cpu_bind_gives_each_rank_its_own_cpus():
    assert cpu_bind([0, 1], 2) == "0|1"
    assert cpu_bind([2, 3, 4, 5, 6], 2) == "2,3|4,5"
    with pytest.raises(ValueError, match="2 ranks need 2 CPUs, 1 usable"):
        cpu_bind([0], 2)


def test_plan_layout_refuses_in_one_line_with_the_device_facts_given():
    spec = EngineSpec(model="preset:internvl3-38b")
    with pytest.raises(ConfigError) as e:
        engine_mod.plan_layout(spec, None, cuda=True, devices=Devices(1, 80, 16))
    assert str(e.value) == ("InternVL3-38B needs ~77 GB of weights: pass "
                            "--tensor-parallel-size 2 on a machine with 2 such GPUs (1 visible "
                            "here) or use a GPU with more memory")
    two = EngineSpec(model="preset:internvl3-38b", tensor_parallel_size=2)
    layout = engine_mod.plan_layout(two, None, cuda=True, devices=Devices(8, 80, 64))
    assert (layout.engines, layout.devices) == (4, ("0,1", "2,3", "4,5", "6,7"))
    # --replicas given: that many, placed over the groups
    layout = engine_mod.plan_layout(two, 2, cuda=True, devices=Devices(8, 80, 64))
    assert (layout.engines, layout.devices) == (2, ("0,1", "2,3"))
    # a hub id's size is unknown before vLLM fetches it: as asked
    hub = engine_mod.plan_layout(EngineSpec(model="org/name"), 3, cuda=True,
                                 devices=Devices(1, 80, 16))
    assert hub.engines == 3 and hub.refusal is None


def test_a_synthesized_checkpoint_plans_as_its_preset(tmp_path):
    """`model synth` writes each large preset's config (no weights); the planner reads the
    folder as it reads the preset's shapes."""
    for preset in ("internvl3-14b", "internvl3-38b", "internvl3-78b"):
        res = CliRunner().invoke(cli, ["model", "synth", "--preset", preset,
                                       "--out", str(tmp_path / preset)])
        assert res.exit_code == 0, res.output
        cfg = json.loads((tmp_path / preset / "config.json").read_text())
        lm, p = cfg["llm_config"], PRESETS[preset].lm
        assert (lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"],
                lm["num_key_value_heads"], lm["intermediate_size"], lm["vocab_size"]) == \
            (p.hidden, p.layers, p.heads, p.kv_heads, p.mlp, p.vocab)
        assert not list((tmp_path / preset).glob("*.safetensors"))
        assert sizing.model_size(tmp_path / preset) == _size(preset)
    assert json.loads((tmp_path / "internvl3-38b" / "config.json").read_text())[
        "vision_config"]["hidden_size"] == 3200


def test_device_facts_follow_cuda_visible_devices(tmp_path, monkeypatch):
    """nvidia-smi lists every GPU of the node; CUDA_VISIBLE_DEVICES (Slurm sets it) names
    the ones this process may use."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, GPU-a, 81559\\n1, GPU-b, 81559\\n"
                    "2, GPU-c, 143771\\n3, GPU-d, 143771\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    facts = engine_mod.device_facts(True)
    assert (facts.gpus, facts.ids, round(facts.memory_gb, 1)) == (4, ("0", "1", "2", "3"), 85.5)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-c,3")
    facts = engine_mod.device_facts(True)
    assert (facts.gpus, facts.ids, round(facts.memory_gb, 1)) == (2, ("GPU-c", "3"), 150.8)
    cpu = engine_mod.device_facts(False)
    assert cpu.gpus == 0 and cpu.memory_gb > 0


def test_replicas_get_their_gpu_groups(monkeypatch):
    from internvl_batch.replicas import ReplicaPool

    monkeypatch.setattr(engine_mod, "device_facts",
                        lambda cuda: Devices(4, 80, 32, ids=("4", "5", "6", "7")))
    pool = ReplicaPool(EngineSpec(model="/m", tensor_parallel_size=2), Path("/c"), 2)
    pool.cuda = True
    assert pool._placement() == (("4,5", "6,7"), 1)
    pool.cuda = False
    assert pool._placement() == ((None, None), 2)


def test_the_parallel_sizes_reach_vllm(tmp_path, monkeypatch):
    model = str(tmp_path / "m")
    synthesize("tiny", model)
    one = engine_mod.llm_kwargs(EngineSpec(model=model), cuda=False)
    assert "tensor_parallel_size" not in one and one["gpu_memory_utilization"] == 0.2
    tp = EngineSpec(model=model, tensor_parallel_size=2, pipeline_parallel_size=2)
    kw = engine_mod.llm_kwargs(tp, cuda=True)
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"]) == (2, 2)
    # on CPU each rank sizes its own KV cache from host RAM: together what one engine takes
    cpu = engine_mod.llm_kwargs(EngineSpec(model=model, tensor_parallel_size=2), cuda=False)
    assert cpu["gpu_memory_utilization"] == 0.1
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(ConfigError, match="4 ranks need 4 CPUs, 2 usable"):  # 2 x 2 ranks
        engine_mod.cpu_parallel_env(tp)
    two = EngineSpec(model=model, tensor_parallel_size=2)
    assert engine_mod.cpu_parallel_env(two) == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert engine_mod.cpu_parallel_env(EngineSpec(model=model)) == {}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1|0")  # the user's own stays
    assert engine_mod.cpu_parallel_env(two) == {}


def test_the_cache_key_names_the_layout(monkeypatch):
    monkeypatch.setattr(cache_mod, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(cache_mod, "model_config_hash", lambda m: "hash")
    one = cache_mod.key_fields(EngineSpec(model="/m/InternVL3-38B"))
    assert "tensor_parallel_size" not in one["engine"]  # entries built before keep their keys
    two = cache_mod.key_fields(EngineSpec(model="/m/InternVL3-38B", tensor_parallel_size=2))
    assert two["engine"]["tensor_parallel_size"] == 2
    assert "-eager-tp2-nvidia" in cache_mod.entry_key(two)
    assert "-tp" not in cache_mod.entry_key(one)
    four = EngineSpec(model="/m/InternVL3-38B", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert "-eager-tp2-pp2-" in cache_mod.entry_key(cache_mod.key_fields(four))


def test_slurm_jobs_request_the_engines_gpus(tmp_path):
    from internvl_batch.slurm import submit_plan
    from tests.test_slurm import _fake_tool, _script_env

    def plan(spec, k):
        return submit_plan(dataset="sample", engine=spec, output=str(tmp_path / "out"),
                           cache_dir="/c", run_args="", shards=8, gpus_per_node=k,
                           partition=None, time_="01:00:00", mem=None, cpus_per_task=None,
                           cpu=False, max_running=None, bin_="internvl-batch", activate="")

    spec = EngineSpec(model="preset:internvl3-38b", tensor_parallel_size=2)
    one = plan(spec, 1).scripts()
    for name in ("warm-cache.sbatch", "caption-array.sbatch"):
        lines = one[name].splitlines()
        assert "#SBATCH --gres=gpu:2" in lines and "ivb_set IVB_GPUS_PER_TASK 2" in lines
        assert "ivb_set_args IVB_ENGINE_ARGS '--tensor-parallel-size 2'" in lines
    assert "#SBATCH --mem=128G" in one["caption-array.sbatch"].splitlines()
    multi = plan(spec, 4).scripts()["caption-array.sbatch"]
    assert "#SBATCH --gpus-per-task=2" in multi.splitlines()
    # the srun of a multi-task job asks for the same GPUs per task
    env = _script_env(tmp_path, SLURM_NTASKS="4", SLURM_JOB_ID="5")
    _fake_tool(tmp_path / "bin" / "srun", f'echo "$*" >> {tmp_path}/srun.calls\n')
    script = tmp_path / "caption.sbatch"
    script.write_text(multi)
    subprocess.run(["bash", str(script)], env=env, capture_output=True, timeout=30)
    assert "--gpus-per-task=2" in (tmp_path / "srun.calls").read_text().split()
    # unchanged for one GPU
    assert "#SBATCH --gres=gpu:1" in plan(EngineSpec(model="m"), 1).scripts()[
        "caption-array.sbatch"].splitlines()


def test_run_help_lists_the_parallel_sizes():
    out = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200).output
    assert "--tensor-parallel-size" in out and "--pipeline-parallel-size" in out


def test_run_refuses_a_model_that_cannot_fit_in_one_line(tmp_path):
    """The real command on this CPU host: InternVL3-78B's weights are more than its RAM; one
    line, exit 2, before anything is written or synthesized."""
    p = subprocess.run([sys.executable, "-m", "internvl_batch", "run", "--dataset", "sample",
                        "--model", "preset:internvl3-78b", "--output", str(tmp_path / "o"),
                        "--cache-dir", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert err[0].startswith("Error: InternVL3-78B needs ~157 GB of weights: this host has ")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()

