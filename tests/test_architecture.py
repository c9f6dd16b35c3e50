"""The layers named in instructgpt/__init__.py hold: the math imports nothing heavy, no stage imports another, every
import of the package's own modules is at the top of its module, and there is no import cycle."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "instructgpt"
MATH = ("losses", "advantages", "kl_control")
STAGES = ("pretrain", "sft", "rm", "ppo", "dpo")
# where an import of the package's own modules may wait until it is needed: the command dispatcher (fast --help), and
# the wrapper of an optional package (vllm)
LAZY_OK = {"cli"}
OPTIONAL = {("serving.app", "serving.vllm_engine")}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__") or "__init__"
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def own_imports(tree: ast.AST, top_level_only: bool) -> list[tuple[str, int]]:
    """(module, line) of every import of an instructgpt module, at the top level only or anywhere."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("instructgpt"):
            base = node.module.removeprefix("instructgpt").lstrip(".")
            if base:
                found.append((base, node.lineno))
            else:  # from instructgpt import gold, tasks
                found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("instructgpt."), node.lineno) for a in node.names
                      if a.name.startswith("instructgpt.")]
    return found


def test_math_modules_import_without_transformers_or_fastapi():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'fastapi', 'accelerate', 'peft', 'datasets'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {', '.join('instructgpt.' + m for m in MATH)}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'fastapi'))\n"
        "assert not heavy, heavy\n"
        "import instructgpt.config\n"  # the blocker works: a module that needs transformers fails
        "try:\n"
        "    import instructgpt.modeling\n"
        "except ImportError as e:\n"
        "    print('blocked', e)\n")
    out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "blocked: transformers" in out.stdout or "blocked: peft" in out.stdout


def test_no_stage_imports_another_stage():
    mods = modules()
    for stage in STAGES:
        others = {m for m, _ in own_imports(mods[stage], top_level_only=False)} & (set(STAGES) - {stage})
        assert not others, f"{stage} imports the stage(s) {sorted(others)}"


def test_own_imports_are_at_the_top_of_each_module():
    mods = modules()
    lazy = []
    for name, tree in mods.items():
        if name in LAZY_OK:
            continue
        top = set(own_imports(tree, top_level_only=True))
        lazy += [f"{name}:{line} imports {m}" for m, line in own_imports(tree, top_level_only=False)
                 if (m, line) not in top and (name, m) not in OPTIONAL]
    assert not lazy, "\n".join(lazy)


def test_the_import_graph_has_no_cycle():
    mods = modules()
    graph = {name: {m for m, _ in own_imports(tree, top_level_only=True) if m in mods and m != name}
             for name, tree in mods.items()}
    # a package's own modules import it first (instructgpt.serving.app -> instructgpt.serving)
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [n, m])
                                     if m in path else f"import cycle through {n} -> {m}")
            if m not in state:
                visit(m, path + [n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
