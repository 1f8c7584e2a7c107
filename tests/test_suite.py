"""The test suite's own shape: shared helpers live in conftest.py, so each test module can be read, run and changed
on its own."""

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_the_finder_sees_every_spelling():
    # lazy imports included; conftest is where shared helpers belong, so it does not count
    code = (
        "from .test_a import x\nfrom tests.test_b import y\nimport tests.test_c\n"
        "def f():\n    from . import test_d\n    from .conftest import run\n"
    )
    assert imported_test_modules(ast.parse(code)) == {"test_a", "test_b", "test_c", "test_d"}


def imported_test_modules(tree: ast.AST) -> set[str]:
    """The test modules (`test_*`) that `tree` imports."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")
            if node.level == 0 and module[0] != "tests":
                continue
            names = [".".join([*module, alias.name]) for alias in node.names]
        else:
            continue
        found |= {part for name in names for part in name.split(".") if part.startswith("test_")}
    return found


def test_no_test_module_imports_another():
    offenders = {}
    for path in sorted(TESTS.glob("*.py")):
        imported = imported_test_modules(ast.parse(path.read_text())) - {path.stem}
        if imported:
            offenders[path.name] = sorted(imported)
    assert not offenders, f"move what these share into conftest.py: {offenders}"


def test_no_test_fixes_a_port():
    # launches take a free port from conftest.free_port(); a fixed one is shared by the next test that copies it
    fixed = re.compile(r"port\s*=\s*\d{2,5}\b|--main_process_port\"?,\s*\"?\d")
    offenders = []
    for path in sorted(p for p in TESTS.glob("*.py") if p.name != "test_suite.py"):
        lines = path.read_text().splitlines()
        offenders += [f"{path.name}:{i}" for i, line in enumerate(lines, 1) if fixed.search(line)]
    assert not offenders, f"take the port from conftest.free_port(): {offenders}"
