"""The package's layout, from its imports (parsed with `ast`, nothing is imported):

* no import cycle among internvl_batch's modules (each module of a package is its own node;
  importing a package means its __init__);
* only `internvl_batch/cli/` imports click;
* only the command line (`cli/`), the benchmark wing (`bench/`) and the entry point
  (`__main__`, which only calls the command line) import the wing or the command line: the
  library below never imports the layers above it.

Imports inside functions count too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "internvl_batch"
ROOT = "internvl_batch"


def modules(pkg_dir: Path = PKG, root: str = ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = [root, *path.relative_to(pkg_dir).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def imports(name: str, source: str, is_pkg: bool) -> set[str]:
    """Every absolute module name that `source` (module `name`) imports, anywhere in it.
    `from X import y` yields X.y as well as X: y may be a submodule."""
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def graph(mods: dict[str, tuple[Path, bool]], root: str = ROOT,
          sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name resolves to the longest module
    prefix it names: `internvl_batch.cache.CacheError` -> internvl_batch.cache)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        text = sources[m] if sources is not None else path.read_text()
        for target in imports(m, text, is_pkg):
            if target.split(".")[0] != root:
                continue
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m:
                edges[m].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _all_imports() -> dict[str, set[str]]:
    return {m: imports(m, path.read_text(), is_pkg) for m, (path, is_pkg) in modules().items()}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_package_is_where_the_test_looks():
    mods = modules()
    for expected in ("internvl_batch.cli", "internvl_batch.cli.common", "internvl_batch.bench",
                     "internvl_batch.bench.worker", "internvl_batch.pipeline",
                     "internvl_batch.engine", "internvl_batch.sources"):
        assert expected in mods
    edges = graph(mods)
    assert "internvl_batch.engine" in edges["internvl_batch.pipeline"]
    assert "internvl_batch.pipeline" in edges["internvl_batch.cli.run"]  # a lazy import


def test_no_import_cycles():
    assert cycles(graph(modules())) == []


def test_only_the_command_line_imports_click():
    offenders = sorted(m for m, names in _all_imports().items()
                       if any(n.split(".")[0] == "click" for n in names)
                       and not _inside(m, "internvl_batch.cli"))
    assert offenders == []
    assert any(n == "click" for n in _all_imports()["internvl_batch.cli.common"])


def test_the_library_never_imports_the_command_line_or_the_benchmark():
    upper = ("internvl_batch.cli", "internvl_batch.bench")
    edges = graph(modules())
    assert edges["internvl_batch.__main__"] == {"internvl_batch.cli"}
    offenders = sorted(
        f"{m} -> {t}" for m, targets in edges.items() for t in targets
        if m != "internvl_batch.__main__" and not any(_inside(m, u) for u in upper)
        and any(_inside(t, u) for u in upper))
    assert offenders == []


def test_the_checks_see_a_cycle_and_a_lazy_import():
    """Not vacuous: a tiny package where a imports b at the top and b imports a inside a
    function, and c imports b relatively from a subpackage."""
    sources = {
        "pkg": "",
        "pkg.a": "from . import b\n",
        "pkg.b": "def f():\n    from .a import thing\n    return thing\n",
        "pkg.sub": "",
        "pkg.sub.c": "from ..b import f\nimport click\n",
    }
    mods = {m: (Path("unused"), m in ("pkg", "pkg.sub")) for m in sources}
    edges = graph(mods, root="pkg", sources=sources)
    assert edges["pkg.sub.c"] == {"pkg.b"}
    assert cycles(edges) == [["pkg.a", "pkg.b"]]
    del sources["pkg.b"]
    sources["pkg.b"] = "import os\n"
    assert cycles(graph(mods, root="pkg", sources=sources)) == []


# -- the library starts no command line ---------------------------------------------------------

CLI_MODULES = {ROOT, f"{ROOT}.__main__", f"{ROOT}.cli"}  # what `python -m` runs as the CLI
CLI_BIN = "internvl-batch"
EXEC = {"execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe"}
LAUNCHERS = {"run", "Popen", "call", "check_call", "check_output", "getoutput",
             "getstatusoutput", "system", "popen", "create_subprocess_exec",
             "create_subprocess_shell"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


def _names_the_cli(text: str) -> bool:
    """A command line (one string, as for a shell) that runs the CLI."""
    words = text.split()
    return any(w == CLI_BIN or w.endswith("/" + CLI_BIN) for w in words) or any(
        a == "-m" and b in CLI_MODULES for a, b in zip(words, words[1:]))


def _constants(node: ast.AST) -> list:
    return [e.value if isinstance(e, ast.Constant) else None for e in node.elts]


def cli_launches(source: str) -> list[str]:
    """Where `source` re-executes its process (os.exec*) or runs the command line as a
    subprocess, by line: an argv with `-m internvl_batch`, a launcher (subprocess, os.system)
    given the `internvl-batch` executable or `-m internvl_batch`, or the package handed to
    a helper of this module that builds `python -m MODULE` argvs."""
    tree = ast.parse(source)
    argv_helpers = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                    and any(isinstance(n, (ast.List, ast.Tuple)) and "-m" in _constants(n)
                            for n in ast.walk(f))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rpartition(".")[2]
            if last in EXEC and name in (last, f"os.{last}"):
                found.append(f"line {node.lineno}: {name}")
            elif last in LAUNCHERS and any(_names_the_cli(s) for s in _strings(node)):
                found.append(f"line {node.lineno}: {name} runs the CLI")
            elif last in argv_helpers and any(isinstance(a, ast.Constant)
                                              and a.value in CLI_MODULES for a in node.args):
                found.append(f"line {node.lineno}: {name} builds a CLI argv")
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = _constants(node)
            if any(a == "-m" and b in CLI_MODULES for a, b in zip(items, items[1:])):
                found.append(f"line {node.lineno}: an argv that runs the CLI")
    return found


def test_the_library_starts_no_command_line():
    """Library processes start from library entry points (processes/), never as
    `python -m internvl_batch COMMAND` or by re-executing the command: the CLI is a layer
    above the library, and a process re-executed in place hides what started it."""
    offenders = []
    for m, (path, _) in modules().items():
        if m == "internvl_batch.__main__" or _inside(m, "internvl_batch.cli") \
                or _inside(m, "internvl_batch.bench"):
            continue
        offenders += [f"{m} {hit}" for hit in cli_launches(path.read_text())]
    assert offenders == []


def test_the_command_line_check_sees_a_launch():
    """Not vacuous: what the library did before (a replica as a hidden command, a restart
    with os.execv) and other spellings are found; other subprocesses and entry points of
    library modules are not."""
    flagged = {
        "exec": "import os, sys\n"
                "os.execv(sys.executable, [sys.executable, '-m', 'internvl_batch', *args])\n",
        "execl": "from os import execl\nexecl('/bin/sh', 'sh')\n",
        "helper": "import subprocess, sys\n"
                  "def module_argv(module, *args):\n"
                  "    return [sys.executable, '-m', module, *args]\n"
                  "subprocess.Popen(module_argv('internvl_batch', 'replica', 'c'))\n",
        "argv": "import subprocess, sys\n"
                "subprocess.Popen([sys.executable, '-m', 'internvl_batch', 'replica', 'c'])\n",
        "bin": "import subprocess\nsubprocess.run(['internvl-batch', 'run', '-o', 'x'])\n",
        "shell": "import os\nos.system('cd /x && /venv/bin/internvl-batch run -o out')\n",
    }
    for name, source in flagged.items():
        assert cli_launches(source), name
    allowed = (
        "import shutil, subprocess, sys\n"
        "subprocess.run(['sbatch', '--parsable', 'job.sbatch'])\n"
        "subprocess.Popen([sys.executable, '-m', 'internvl_batch.processes.entry'])\n"
        "exe = shutil.which('internvl-batch')\n"
        "text = f'srun {exe} run --output out'\n"
        "row = ('internvl-batch', md.get('internvl_batch'))\n"
        "pkg = resources.files('internvl_batch')\n"
    )
    assert cli_launches(allowed) == []
