"""The packages are layers and every import runs down (README, "Layout"):

    commands/                    the kl-ae command line, rd, bench
    training/   eval/            side by side, never importing each other
    common/                      config and errors, images and data, LPIPS, metrics, run folders, release
    kl_autoencoder/              the model: imports nothing of ours

Imports inside functions count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kl_autoencoder", "common", "training", "eval", "commands", "configs")
# what each package may import besides itself
ALLOWED = {
    "kl_autoencoder": set(),
    "common": {"kl_autoencoder"},
    "training": {"kl_autoencoder", "common"},
    "eval": {"kl_autoencoder", "common"},
    "commands": {"kl_autoencoder", "common", "training", "eval", "configs"},
    "configs": set(),
}


def imports_of(path: Path) -> set[str]:
    """Our top-level packages that the module at `path` imports, anywhere in it."""
    package = path.relative_to(ROOT).parts[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


def import_graph() -> dict[str, set[str]]:
    """{package: the other packages it imports}."""
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            graph[package] |= imports_of(path) - {package}
    return graph


def test_every_import_runs_down():
    graph = import_graph()
    upward = {p: sorted(deps - ALLOWED[p]) for p, deps in graph.items() if deps - ALLOWED[p]}
    assert not upward, f"imports against the layers: {upward}"


def test_training_and_eval_do_not_load_each_other():
    # the import statements are checked above; this checks what actually gets loaded, in a fresh interpreter
    import subprocess
    import sys

    code = (
        "import sys, importlib, pkgutil\n"
        "for top in ('training', 'eval'):\n"
        "    pkg = importlib.import_module(top)\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{top}.{m.name}')\n"
        "    other = 'eval' if top == 'training' else 'training'\n"
        "    assert not any(k == other or k.startswith(other + '.') for k in sys.modules), (top, other)\n"
        "    for k in [k for k in sys.modules if k == top or k.startswith(top + '.')]:\n"
        "        del sys.modules[k]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_about_400_lines(package):
    long = {p.name: n for p in (ROOT / package).glob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"{package}: split these: {long}"
