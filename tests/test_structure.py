"""The package's import structure (DESIGN.md, "Layers"): no import cycles, imports point down only, and a
deployed model (the runtime) runs without the training code."""

import ast
import subprocess
import sys
from pathlib import Path

import pocketquant

ROOT = Path(pocketquant.__file__).parent
# DESIGN.md's layers; a module imports only from its own layer or lower ones
LAYERS = [
    ("errors", "config", "scheme", "files", "progress", "tables"),
    ("numerics", "hadamard", "packing"),
    ("model", "layers"),
    ("tokenizer", "data", "fetch"),
    ("checkpoints",),
    ("runtime", "quant"),
    ("eval", "bench", "export", "inspect", "server", "cli", "__init__", "__main__", "api"),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)] = path
    return out


def imports(path: Path, known: dict) -> set[str]:
    """The pocketquant modules `path` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]  # a module, or a name in node.module
        else:
            continue
        for name in names:
            if name.startswith("pocketquant."):
                name = name[len("pocketquant."):]
                while name and name not in known:  # the module that holds it
                    name = name.rpartition(".")[0]
                found.add(name or "__init__")
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} has no layer in this test: add it to LAYERS as DESIGN.md places it")


def test_no_import_cycles():
    edges, cycles = graph(), []
    for start in edges:  # a path back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_imports_point_down():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    upward += [f"{a} -> {b}" for a, targets in graph().items() for b in targets
               if a.startswith(("runtime", "server")) and b.startswith("quant")]
    assert not upward, "imports pointing up (or from the runtime into quant):\n" + "\n".join(upward)


def test_a_deployed_model_runs_without_the_training_code(tiny_text_dir, tmp_path):
    """Load a packed file, generate, chat: nothing from pocketquant.quant is imported."""
    from pocketquant.quant.recipe import from_options, quantize

    quantize(tiny_text_dir[0], from_options("rtn"), tmp_path / "m.safetensors", progress=False)
    code = (f"import sys, torch; from pocketquant.runtime import load; "
            f"from pocketquant.runtime.generate import stream_tokens; "
            f"m = load({str(tmp_path / 'm.safetensors')!r}).model; "
            f"print(len(list(stream_tokens(m, [1, 2, 3], 4)))); "
            f"print(sorted(n for n in sys.modules if n.startswith('pocketquant.quant')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["4", "[]"], proc.stdout
