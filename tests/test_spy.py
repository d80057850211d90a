"""`python -m internvl_batch.bench.spy`: py-spy's raw stacks summarized per process and
category (the host profile). The format is py-spy 0.4's `record --format raw
--subprocesses`, as recorded on this machine from `bench-ab --engine-core process`."""
from __future__ import annotations

import json
import subprocess
import sys

from internvl_batch.bench import spy

CORE = 'process 10:"python -m internvl_batch bench-ab";process 12:"python -B -c from multi'
RAW = "\n".join([
    # the engine core: waiting for its worker, a step, one import late in its life
    f"{CORE};run_engine_core (vllm/v1/engine/core.py:900);sched_yield (vllm/distributed/utils.py:46) 30",
    f"{CORE};step (vllm/v1/engine/core.py:380);schedule (vllm/v1/core/sched/scheduler.py:250) 10",
    f"{CORE};execute_model (vllm/v1/worker/gpu_model_runner.py:3940);forward "
    "(vllm/model_executor/models/internvl.py:1400);__call__ (torch/_ops.py:875) 20",
    f"{CORE};execute_model (vllm/model_executor/models/x.py:1);_call_with_frames_removed "
    "(<frozen importlib._bootstrap>:241);_create_fn (dataclasses.py:433) 5",
    f"{CORE};decode (vllm/v1/serial_utils.py:300) 5",
    # the front: a multimodal processor call and a line of ours
    'process 10:"python -m internvl_batch bench-ab";feed (internvl_batch/bench/ab.py:402);'
    "add_request (vllm/v1/engine/llm_engine.py:250);apply (vllm/multimodal/processing.py:9);"
    "resize (PIL/Image.py:2440) 8",
    'process 10:"python -m internvl_batch bench-ab";feed (internvl_batch/bench/ab.py:402) 2',
    # a process whose command line has newlines (python -c "..."): one stack over 3 lines
    'process 10:"python -m internvl_batch bench-ab";process 20:"python -c ',
    "import sys",
    '";CDLL.__init__ (ctypes/__init__.py:376) 4',
    "",
    "not a stack",
])


def test_parse_takes_the_innermost_process_and_joins_split_command_lines():
    got = spy.parse(RAW.splitlines(keepends=True))
    assert [(p.split()[0], n) for p, _, n in got] == [("12", 30), ("12", 10), ("12", 20),
                                                       ("12", 5), ("12", 5), ("10", 8),
                                                       ("10", 2), ("20", 4)]
    assert got[-1][1] == ["CDLL.__init__ (ctypes/__init__.py:376)"]
    assert got[0][0] == "12 python -B -c from multi"


def test_summarize_categorises_from_the_leaf_up_with_imports_first():
    s = spy.summarize(spy.parse(RAW.splitlines()), rate=10.0)
    core = s["processes"]["12 python -B -c from multi"]
    assert core["samples"] == 70 and core["seconds"] == 7.0
    cats = {c: v["samples"] for c, v in core["categories"].items()}
    assert cats == {"waiting (busy-yield, poll, queue)": 30,
                    "model forward (kernel launches, compiled graphs)": 20,
                    "scheduler and KV cache manager": 10, spy.STARTUP: 5,
                    "serialization (msgpack, pickle, zmq send)": 5}
    assert core["categories"]["waiting (busy-yield, poll, queue)"]["share"] == round(30 / 70, 4)
    front = s["processes"]["10 python -m internvl_batch bench-ab"]["categories"]
    assert front["multimodal input processing (HF processor, PIL, hashing)"]["samples"] == 8
    assert front["internvl_batch"]["top_leaves"] == [("feed (internvl_batch/bench/ab.py:402)", 2)]
    assert list(s["processes"])[0].startswith("12 ")  # busiest first
    md = spy.markdown(s)
    assert "**12 python -B -c from multi**: 70 samples (7.0 thread-seconds)" in md
    assert "| waiting (busy-yield, poll, queue) | 42.9 % | 3.0 | `sched_yield " in md


def test_cli_writes_markdown_and_json_and_refuses_bad_input(tmp_path):
    raw = tmp_path / "spy.txt"
    raw.write_text(RAW)
    out = tmp_path / "s.json"
    run = lambda *a: subprocess.run([sys.executable, "-m", "internvl_batch.bench.spy", *a],  # noqa: E731
                                    capture_output=True, text=True)
    ok = run(str(raw), "--rate", "10", "--json", str(out))
    assert ok.returncode == 0 and "Host time by process" in ok.stdout
    assert json.loads(out.read_text())["processes"]["20 python -c \\nimport sys\\n"]["samples"] == 4
    for args, msg in (([str(tmp_path / "none.txt"), "--rate", "10"], "no such file"),
                      ([str(raw), "--rate", "0"], "--rate must be > 0")):
        bad = run(*args)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "empty.txt").write_text("nothing here\n")
    bad = run(str(tmp_path / "empty.txt"), "--rate", "10")
    assert bad.returncode == 2 and "no py-spy raw stacks" in bad.stderr
