"""The package's layout rules (README.md, "Architecture"), read from the source with `ast`.

Each rule is checked on the real package, and on a small planted tree that breaks it, so that a
checker that stopped seeing violations would fail here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "zimage_trt"
MAX_LINES = 600

# room -> the rooms it may import (a room is a sub-package, or a top-level module of the package).
ALLOWED = {
    "errors": set(),
    "files": set(),
    "model": {"model"},
    "engines": {"engines", "model", "files", "errors"},
    "compiler": {"compiler", "engines", "model", "files", "errors"},
    "runtime": {"runtime", "parallel", "engines", "model", "errors"},
    "parallel": {"parallel", "engines", "model", "files", "errors"},
    "testing": {"testing", "model"},
    "lora": {"lora", "model"},
    "request": {"model"},
    "options": {"model", "runtime"},
    "pipeline": {"runtime", "parallel", "engines", "model", "request", "options", "errors", "lora"},
    "tasks": {"pipeline", "runtime", "model", "request", "options", "errors"},
    "benchmark": {"benchmark", "pipeline", "tasks", "compiler", "runtime", "engines", "model", "testing", "files",
                  "lora"},
    "demo": {"pipeline", "compiler", "engines", "model", "testing"},
    "compare": {"benchmark", "pipeline", "compiler", "model", "testing", "files"},
    "serving": {"serving", "pipeline", "parallel", "tasks", "request", "options", "runtime", "engines", "model", "errors", "files",
                "testing"},
    "cli": {"benchmark", "pipeline", "tasks", "parallel", "compiler", "compare", "demo", "model", "serving", "runtime"},
}
FP8_HOME = "model/fp8.py"
PRECISION_HOME = "model/precision.py"
CONTRACT_HOME = "engines/contract.py"
FILES_HOME = "files.py"
CONTRACT_NAMES = {"timestep", "cap_feats", "cap_lens", "noise_pred"}  # ("latents" also names a callback input)
PRECISION_NAMES = {"fp16", "bf16", "fp32", "fp8"}
TORCH_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "half", "float"}


def room_of(relative: Path) -> str:
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def internal_target(relative: Path, node: ast.ImportFrom | ast.Import, package: str) -> list[str]:
    """The rooms an import statement reaches inside the package (empty for outside imports)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name == package or a.name.startswith(package + ".")]
        return [n.split(".")[1] if "." in n else "" for n in names]
    if node.level == 0:
        if node.module is None or not (node.module == package or node.module.startswith(package + ".")):
            return []
        parts = node.module.split(".")[1:]
    else:
        base = list(relative.parent.parts)
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        parts = base + (node.module.split(".") if node.module else [])
    if parts:
        return [parts[0]]
    return [alias.name for alias in node.names]  # `from . import x` at the top: x is the room


def check_tree(root: Path, package: str = "zimage_trt") -> list[str]:
    """Every broken rule under `root` (the package folder), one line each."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        where = relative.as_posix()
        room = room_of(relative)
        lines = len(text.splitlines())
        if lines > MAX_LINES:
            problems.append(f"{where}: {lines} lines, over {MAX_LINES}: split it by job")
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [t for t in internal_target(relative, node, package) if t and t != "__init__"]
                if targets and id(node) not in top_level and relative.name != "__init__.py":
                    problems.append(f"{where}:{node.lineno}: package-internal import inside a function "
                                    f"(imports go at the top; only optional heavy dependencies may wait)")
                if room in ALLOWED:
                    for target in targets:
                        if target != room and target not in ALLOWED[room]:
                            problems.append(f"{where}:{node.lineno}: {room} may not import {target}")
            elif isinstance(node, ast.ClassDef) and "fp8" in node.name.lower() and where != FP8_HOME:
                problems.append(f"{where}:{node.lineno}: FP8 layer {node.name} defined outside {FP8_HOME}")
            elif isinstance(node, ast.Attribute) and node.attr == "_scaled_mm" and where != FP8_HOME:
                problems.append(f"{where}:{node.lineno}: FP8 products (_scaled_mm) outside {FP8_HOME}")
            elif isinstance(node, ast.Dict) and where != PRECISION_HOME:
                strings = {k.value for k in [*node.keys, *node.values] if isinstance(k, ast.Constant)}
                dtypes = {v.attr for v in [*node.keys, *node.values] if isinstance(v, ast.Attribute)}
                if strings & PRECISION_NAMES and dtypes & TORCH_FLOAT_DTYPES:
                    problems.append(f"{where}:{node.lineno}: a precision <-> dtype table outside {PRECISION_HOME}")
            elif (isinstance(node, ast.Constant) and node.value in CONTRACT_NAMES and where != CONTRACT_HOME):
                problems.append(f"{where}:{node.lineno}: the engine input {node.value!r} spelled outside {CONTRACT_HOME}")
            elif (isinstance(node, ast.Attribute) and node.attr in ("replace", "rename", "move")
                  and isinstance(node.value, ast.Name) and node.value.id in ("os", "shutil") and where != FILES_HOME):
                problems.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr} outside {FILES_HOME} "
                                f"(write whole-or-nothing through files.staged / publish)")
    return problems


def import_cycles(root: Path, package: str = "zimage_trt") -> list[list[str]]:
    """Cycles among the rooms' top-level imports."""
    edges: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        room = room_of(relative)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in internal_target(relative, node, package):
                    if target and target != room and target != "__init__":
                        edges.setdefault(room, set()).add(target)
    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_package_keeps_its_rules():
    problems = check_tree(PACKAGE)
    assert not problems, "layout rules broken (README.md, Architecture):\n" + "\n".join(problems)


def test_the_rooms_import_without_cycles():
    assert import_cycles(PACKAGE) == []


def test_every_room_has_a_rule():
    rooms = {room_of(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert rooms <= set(ALLOWED), f"rooms without a rule in ALLOWED: {sorted(rooms - set(ALLOWED))}"
    assert {"model", "engines", "compiler", "runtime", "pipeline"} <= rooms


PLANTED = {
    "runtime/loop.py": "from ..compiler.build import build_engines\n",
    "pipeline.py": "def go():\n    from .runtime import loop\n",
    "engines/select.py": "from .. import pipeline\n",
    "runtime/fast.py": "import torch\nclass MyFp8Linear(torch.nn.Module):\n    pass\n",
    "compiler/export.py": "import torch\nDTYPES = {'fp16': torch.float16}\n",
    "runtime/buffers.py": "NAMES = ('cap_feats',)\n",
    "compiler/build.py": "import os\nos.replace('a', 'b')\n",
    "model/big.py": "x = 1\n" * (MAX_LINES + 1),
    "model/a.py": "from ..engines import select\n",
}


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "zimage_trt"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("name, expected", [
    ("runtime/loop.py", "runtime may not import compiler"),
    ("pipeline.py", "package-internal import inside a function"),
    ("engines/select.py", "engines may not import pipeline"),
    ("runtime/fast.py", "FP8 layer MyFp8Linear defined outside model/fp8.py"),
    ("compiler/export.py", "precision <-> dtype table outside"),
    ("runtime/buffers.py", "'cap_feats' spelled outside engines/contract.py"),
    ("compiler/build.py", "os.replace outside files.py"),
    ("model/big.py", f"{MAX_LINES + 1} lines, over {MAX_LINES}"),
    ("model/a.py", "model may not import engines"),
])
def test_each_rule_catches_a_planted_break(tmp_path, name, expected):
    root = plant(tmp_path, {name: PLANTED[name]})
    problems = check_tree(root)
    assert any(expected in p and p.startswith(name) for p in problems), problems


def test_a_planted_cycle_is_found(tmp_path):
    root = plant(tmp_path, {"model/a.py": "from ..engines import b\n", "engines/b.py": "from ..model import a\n"})
    assert import_cycles(root) == [["engines", "model", "engines"]]
