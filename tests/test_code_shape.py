"""Rules of the tree's shape that `ast` can check (nothing is imported):

* no function or method longer than 80 lines, anywhere in the tree (the package, tests,
  measuring scripts): past that a function does several things, and its pieces deserve names;
* the benchmark wing's modules share helpers through public names (`bench/common.py`), never
  by importing another wing module's private ones.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
# virtual environments, GPU bundles, bisect checkouts, build outputs: not the project's code
SKIP_DIRS = {".venv", ".gpu", ".bisect", ".git", "build", "dist", "__pycache__",
             ".pytest_cache", "node_modules"}
WING = "internvl_batch.bench"


def python_files(root: Path = ROOT) -> list[Path]:
    out = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        out += [Path(here) / f for f in sorted(files) if f.endswith(".py")]
    return out


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function longer than `limit` lines, from its
    `def` line to its last line (decorators not counted; a nested function is counted on
    its own and inside its parent)."""
    return [(n.name, n.lineno, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > limit]


def private_imports(module: str, source: str, package: str = WING) -> list[str]:
    """`from <a module of package> import _name` in `module` (a module of that package too):
    the private names it takes from a sibling. Relative imports resolve from `module`."""
    found = []
    for n in ast.walk(ast.parse(source)):
        if not isinstance(n, ast.ImportFrom):
            continue
        if n.level:
            base = module.split(".")[:-n.level]
            target = ".".join(base + ([n.module] if n.module else []))
        else:
            target = n.module or ""
        if target == package or target.startswith(package + "."):
            found += [f"{target}.{a.name}" for a in n.names if a.name.startswith("_")]
    return found


def test_the_walk_sees_the_tree_and_skips_environments():
    files = {p.relative_to(ROOT).as_posix() for p in python_files()}
    assert {"internvl_batch/pipeline.py", "tests/test_code_shape.py",
            "benchmarks/front_cost.py"} <= files
    assert not any(f.split("/")[0] in SKIP_DIRS for f in files)


def test_no_function_over_80_lines():
    offenders = [f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
                 for p in python_files() for name, line, n in long_functions(p.read_text())]
    assert offenders == []


def test_no_private_imports_between_bench_modules():
    wing = ROOT / "internvl_batch" / "bench"
    offenders = []
    for p in sorted(wing.glob("*.py")):
        # `bench.__init__`: its relative imports resolve from the package, as a module's do
        offenders += [f"{p.name}: {x}" for x in private_imports(f"{WING}.{p.stem}",
                                                                 p.read_text())]
    assert offenders == []


def test_the_checks_are_not_vacuous():
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    src = f"@decorator\ndef long():\n{body}\n\ndef short():\n    pass\n"
    assert long_functions(src) == [("long", 2, 81)]
    assert long_functions(src, limit=81) == []
    src = ("from .encoder import Recorder, _err\nfrom . import _helper\n"
           "from ..hooks import _private\nfrom internvl_batch.bench.ab import _f\n")
    assert private_imports("internvl_batch.bench.ab", src) == [
        "internvl_batch.bench.encoder._err", "internvl_batch.bench._helper",
        "internvl_batch.bench.ab._f"]
