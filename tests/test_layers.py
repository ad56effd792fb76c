"""The package's three rooms: the toolkit imports neither the lab nor the reports; the lab does not import reports;
one module (``mechrecall.arch``) knows model internals."""

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mechrecall"
# One module composes the rooms: the package's own command line (``python -m mechrecall``: train, reproduce, eval),
# which nothing imports. Every other module outside ``lab/`` and ``report/`` is toolkit, its command lines included.
COMPOSER = PKG / "__main__.py"
TOOLKIT = sorted(p for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] not in ("lab", "report") and p != COMPOSER)
LAB = sorted((PKG / "lab").rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("path", TOOLKIT, ids=lambda p: str(p.relative_to(PKG)))
def test_toolkit_imports_neither_lab_nor_reports(path):
    bad = sorted(m for m in imported(path) if re.match(r"mechrecall\.(lab|report)\b", m))
    assert not bad, f"{path.relative_to(PKG)} imports {bad}"


@pytest.mark.parametrize("path", LAB, ids=lambda p: str(p.relative_to(PKG)))
def test_lab_does_not_import_reports(path):
    bad = sorted(m for m in imported(path) if re.match(r"mechrecall\.report\b", m))
    assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from mechrecall.lab.train import train\n")
    assert "mechrecall.lab.train" in imported(f)


# Model internals: module paths and parameter names of particular architectures live in mechrecall/arch.py only.
INTERNALS = re.compile(
    r"\.model\.layers|\bgpt_neox\b|transformer\.h\b|\b(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|"
    r"query_key_value|c_attn|post_attention_layernorm|input_layernorm|self_attn|rotary_emb|LlamaDecoderLayer|"
    r"embed_tokens)\b"
)


@pytest.mark.parametrize(
    "path",
    [p for p in TOOLKIT if p.name != "arch.py"],
    ids=lambda p: str(p.relative_to(PKG)),
)
def test_only_the_architecture_layer_names_model_internals(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1) if INTERNALS.search(line)]
    assert not hits, f"{path.relative_to(PKG)} reaches into model internals:\n" + "\n".join(hits)


# ------------------------------------------------------------------------------------------------ public API
ROOT = PKG.parent
TOOLKIT_MODULES = sorted(
    ".".join(("mechrecall", *p.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")
    for p in TOOLKIT
    if p.name != "__init__.py" or p.parent != PKG
)


@pytest.mark.parametrize("module", TOOLKIT_MODULES)
def test_every_toolkit_module_says_what_is_public(module):
    import importlib

    mod = importlib.import_module(module)
    assert hasattr(mod, "__all__"), f"{module} has no __all__"
    assert [n for n in mod.__all__ if not hasattr(mod, n)] == [], f"{module}.__all__ names what it does not define"


def _user_code() -> list[tuple[str, str]]:
    """(where, source) of the analyses/ scripts and the notebooks' code cells: the toolkit's users in this repo."""
    import json

    out = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "analyses").glob("*.py"))]
    for nb in sorted((ROOT / "examples").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        out += [(f"{nb.name} cell {i}", "".join(c["source"])) for i, c in enumerate(code)]
    return out


def test_analyses_and_notebooks_import_only_public_toolkit_names():
    import importlib

    public = {m: set(importlib.import_module(m).__all__) for m in TOOLKIT_MODULES}
    bad = []
    for where, src in _user_code():
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.module in public:
                bad += [f"{where}: {node.module}.{a.name}" for a in node.names if a.name not in public[node.module]]
    assert bad == []


def test_importing_the_library_changes_no_environment_variable():
    """Only the command lines (``mechrecall.cli``, imported by every entry point) set the environment they need."""
    import subprocess
    import sys

    command_lines = [m for m in TOOLKIT_MODULES if m == "mechrecall.cli" or m.endswith("__main__")]
    modules = [m for m in TOOLKIT_MODULES if m not in command_lines] + [
        "mechrecall.lab.train",
        "mechrecall.report.page",
    ]
    third_party = ["torch", "transformers", "transformer_lens", "nnsight", "peft", "accelerate", "plotly", "pandas"]
    code = (
        f"import os, importlib\nfor m in {third_party!r}: importlib.import_module(m)\n"  # (torch sets one of its own)
        "before = dict(os.environ)\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "print(changed)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def _module_of(path: Path) -> str:
    return ".".join(("mechrecall", *path.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")


def _import_cycles() -> list[list[str]]:
    """Cycles of the package's import graph (function-level imports included; a package's ``__init__`` re-exporting
    its own modules is not an edge back from them)."""
    modules = {_module_of(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for m in imported(path):
            while m and m not in modules:
                m = m.rpartition(".")[0]
            if m and m != name and not name.startswith(m + ".") and m.startswith("mechrecall"):
                targets.add(m)
        graph[name] = targets
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycles():
    assert _import_cycles() == []
