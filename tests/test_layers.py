"""The packages are layers and every import runs down (docs/layout.md):

    kl_ae/commands/              the kl-ae command line, rd, study
    kl_ae/bench/                 `kl-ae bench`
    training/   eval/            side by side, never importing each other
    kl_ae/common/                config and errors, images and data, LPIPS, metrics, run folders, release
    kl_autoencoder/              the model: imports nothing of ours

Imports inside functions count too: a lazy import is still an arrow, and so is a read of a package's files
through `importlib.resources.files("...")`. Inside a package the modules' imports form no circle, and no
function is longer than about a screenful.
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
# the folders whose functions are held to MAX_FUNCTION_LINES: all of our code (kl_ae: common, commands, bench)
CODE = ("kl_autoencoder", "kl_ae", "training", "eval")
MAX_FUNCTION_LINES = 100
# calls that load a module or a package's files by name: `importlib.import_module("x")`, `resources.files("x")`
LOADERS = {"import_module", "files"}


def folder(package: str) -> Path:
    return FOLDERS.get(package, ROOT.joinpath(*package.split(".")))


def package_of(name: str) -> str | None:
    """The layer a dotted module name belongs to (the longest matching package), or None if not ours."""
    for package in sorted(PACKAGES, key=len, reverse=True):
        if name == package or name.startswith(package + "."):
            return package
    return None


def module_name(path: Path) -> str:
    """The dotted name of the module at `path` (a package's `__init__.py`: the package's name)."""
    package = max((p for p in PACKAGES if folder(p) in path.parents), key=lambda p: len(folder(p).parts))
    parts = [*path.relative_to(folder(package)).with_suffix("").parts]
    return ".".join([package, *parts[:-1], *([] if parts[-1] == "__init__" else parts[-1:])])


def imported_names(path: Path) -> list[tuple[str, list[str]]]:
    """Every (module, names taken from it) that the module at `path` imports, anywhere in it, as absolute dotted
    names; a module or package loaded by a string (`LOADERS`) counts as `import name`."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package a relative import starts from
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:  # relative: from the module's own package (or one above)
                base = here[: len(here) - (node.level - 1)]
                found.append((".".join([*base, *([node.module] if node.module else [])]), names))
            else:
                found.append((node.module or "", names))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in LOADERS and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, []))
    return found


def sources(package: str) -> list[Path]:
    """The modules of `package`, its subpackages included, but not the packages nested in its folder."""
    nested = [folder(p) for p in PACKAGES if p != package and folder(package) in folder(p).parents]
    return [p for p in folder(package).rglob("*.py") if not any(n in p.parents for n in nested)]


def imports_of(path: Path) -> set[str]:
    """Our top-level packages that the module at `path` imports, anywhere in it."""
    return {p for module, _ in imported_names(path) if (p := package_of(module))}


def import_graph() -> dict[str, set[str]]:
    """{package: the other packages it imports}."""
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in sources(package):
            graph[package] |= imports_of(path) - {package}
    return graph


def folders() -> list[Path]:
    """Every folder of our code that holds modules: the packages and their subpackages."""
    return sorted({path.parent for package in PACKAGES for path in sources(package)})


def module_graph(where: Path) -> dict[str, set[str]]:
    """{module: the modules of the same folder it imports} for the modules (file stems) in `where`; importing the
    folder's package itself (`from training import x`) is an arrow to `x` where x is a module, else to
    `__init__`."""
    modules = {p.stem for p in where.glob("*.py")}
    package = module_name(where / "__init__.py")
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m in modules:
        for name, taken in imported_names(where / f"{m}.py"):
            if name == package:
                graph[m] |= {t if t in modules else "__init__" for t in taken} & modules
            elif name.startswith(package + "."):
                head = name[len(package) + 1 :].split(".")[0]
                if head in modules:
                    graph[m].add(head)
        graph[m].discard(m)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_every_import_runs_down():
    graph = import_graph()
    upward = {p: sorted(deps - ALLOWED[p]) for p, deps in graph.items() if deps - ALLOWED[p]}
    assert not upward, f"imports against the layers: {upward}"


def test_resource_reads_are_imports():
    # training reads the recipes with importlib.resources.files("kl_ae.configs"): an arrow like an import
    assert "kl_ae.configs" in imports_of(ROOT / "training" / "config.py")


@pytest.mark.parametrize("where", folders(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_circle_inside_a_folder(where):
    found = circles(module_graph(where))
    assert not found, f"{where.relative_to(ROOT)}: modules that import each other (lazy imports included): {found}"


def test_circle_finder():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


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


def long_functions(top: Path) -> dict[str, int]:
    """{file:function: lines} of every function or method under `top` longer than MAX_FUNCTION_LINES (from its
    `def` line, decorators aside, to its last line, docstring included)."""
    long = {}
    for path in sorted(top.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = n
    return long


@pytest.mark.parametrize("top", CODE)
def test_no_function_is_over_100_lines(top):
    # a function, not a file, is what a reader has to hold at once: long files split by topic, long functions don't
    long = long_functions(ROOT / top)
    assert not long, f"split these into named steps: {long}"
