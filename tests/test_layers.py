"""Imports run down the pipeline (ir -> capture -> passes -> store -> bench -> predict -> sim), and the commands that
only read a compiled IR and a store never load the capture."""

import ast
import json
import subprocess
import sys

import pytest
from helpers import ROOT

PACKAGE = ROOT / "dooly"
# A module imports only modules of its own rank or lower. The foundation (rank 0) is what every stage may use; the
# environment registry names what the store records, for the benchmarks and predictors above it.
RANKS = {
    "dooly.errors": 0, "dooly.config": 0, "dooly.limits": 0, "dooly.transformers_engine": 0,
    "dooly.ir": 1, "dooly.capture": 2, "dooly.passes": 3, "dooly.store": 4, "dooly.environment": 5,
    "dooly.bench": 6, "dooly.predict": 7, "dooly.sim": 8,
}
# Commands: they may import anything, and nothing in the pipeline may import them.
DRIVERS = {"dooly.__main__", "dooly.cli", "dooly.compile", "dooly.profile", "dooly.plan", "dooly.validate",
           "dooly.compare", "dooly.explore", "dooly.ray_backend", "dooly.vllm_profile", "dooly.vllm_validate"}


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_driver(module: str) -> bool:
    return module in DRIVERS or module.endswith(".cli")


def rank(module: str) -> float:
    if is_driver(module):
        return float("inf")
    owner = max((m for m in RANKS if module == m or module.startswith(m + ".")), key=len, default=None)
    assert owner is not None, f"{module} has no place in the pipeline: give it a rank in RANKS or make it a driver"
    return RANKS[owner]


def imports(module: str) -> list[tuple[int, str]]:
    """(line, module) of every Dooly module `module` imports, at the top or inside a function."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from . import host` imports the module dooly.predict.host
            found += [(node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base) for a in node.names]
    return [(line, name) for line, name in found if name == "dooly" or name.startswith("dooly.")]


def test_every_module_imports_only_its_own_layer_or_lower():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
              for m in sorted(MODULES) if not is_driver(m)
              for line, target in imports(m) if rank(target) > rank(m)]
    assert not upward, "imports against the pipeline:\n" + "\n".join(upward)


def test_the_check_sees_imports_inside_functions_and_of_submodules():
    assert "dooly.store" in {target for _, target in imports("dooly.bench.host")}  # inside `main`
    assert "dooly.predict.host" in {target for _, target in imports("dooly.predict.step")}  # `from . import host`


LOADED = ("import json, sys\nfrom dooly.cli import main\ncode = main(sys.argv[1:])\n"
          "print(json.dumps(sorted(m for m in sys.modules if m.startswith('dooly.capture'))), file=sys.stderr)\n"
          "sys.exit(code)")


def capture_modules_loaded(*args) -> list[str]:
    out = subprocess.run([sys.executable, "-c", LOADED, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [
    ["predict", "golden/llama-3.1-8b.ir", "--batch", "prefill:512x2,decode:32@1024"],
    ["simulate", "golden/llama-3.1-8b.ir", "--synthetic", "poisson:rate=2,n=50,prompt=512,output=16",
     "--num-blocks", "1539", "--json"],
])
def test_predicting_and_simulating_a_compiled_ir_never_load_the_capture(command, shipped, tmp_path):
    extra = ["--out", tmp_path / "out"] if command[0] == "simulate" else []
    assert capture_modules_loaded(*command, "--store", shipped, *extra) == []
