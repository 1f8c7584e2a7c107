"""The packages are layers and every import runs down (README, "Layout"):

    kl_ae/commands/              the kl-ae command line, rd, study
    kl_ae/bench/                 `kl-ae bench`
    training/   eval/            side by side, never importing each other
    kl_ae/common/                config and errors, images and data, LPIPS, metrics, run folders, release
    kl_autoencoder/              the model: imports nothing of ours

Imports inside functions count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kl_autoencoder", "kl_ae.common", "training", "eval", "kl_ae.bench", "kl_ae.commands", "kl_ae.configs")
FOLDERS = {"kl_ae.configs": ROOT / "configs"}
# what each package may import besides itself
ALLOWED = {
    "kl_autoencoder": set(),
    "kl_ae.common": {"kl_autoencoder"},
    "training": {"kl_autoencoder", "kl_ae.common", "kl_ae.configs"},
    "eval": {"kl_autoencoder", "kl_ae.common"},
    "kl_ae.bench": {"kl_autoencoder", "kl_ae.common", "training", "eval"},
    "kl_ae.commands": {"kl_autoencoder", "kl_ae.common", "training", "eval", "kl_ae.bench", "kl_ae.configs"},
    "kl_ae.configs": set(),
}


def folder(package: str) -> Path:
    return FOLDERS.get(package, ROOT.joinpath(*package.split(".")))


def package_of(name: str) -> str | None:
    """The layer a dotted module name belongs to (the longest matching package), or None if not ours."""
    for package in sorted(PACKAGES, key=len, reverse=True):
        if name == package or name.startswith(package + "."):
            return package
    return None


def imports_of(path: Path) -> set[str]:
    """Our top-level packages that the module at `path` imports, anywhere in it."""
    package = next(p for p in PACKAGES if folder(p) in path.parents)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        else:
            continue
        found |= {p for name in names if (p := package_of(name))}
    return found


def import_graph() -> dict[str, set[str]]:
    """{package: the other packages it imports}."""
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in folder(package).glob("*.py"):
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
    long = {p.name: n for p in folder(package).glob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"{package}: split these: {long}"
