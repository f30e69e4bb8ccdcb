"""The package's folders import one another only in the directions docs/architecture.md gives, and
its math modules import neither Ray nor verl. Read from the source (every import statement, also
those inside functions), nothing is imported."""

import ast
import os
import sys

from conftest import REPO

PACKAGE = os.path.join(REPO, "verl_npd")

# folder -> the folders of verl_npd it may import (besides itself); top-level modules (``tokenizers``
# and the commands) count as folders of their own name.
MAY_IMPORT = {
    "platform": set(),
    "engines": {"platform"},
    "filters": set(),
    "losses": {"platform"},
    "rollout": {"engines", "filters", "platform"},
    "trainer": {"rollout", "engines", "filters", "losses", "platform", "tokenizers"},
    "toy": set(),
}
# Plain torch (or plain Python): what docs/architecture.md calls math.
MATH_MODULES = ("filters/ifd.py", "filters/delta_ifd.py", "losses/distill.py", "trainer/packing.py")


def imported_modules(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def sources() -> dict[str, str]:
    """Path relative to the package -> absolute path, of every module."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, PACKAGE)] = path
    return found


def test_folders_import_only_downwards():
    wrong = []
    for relative, path in sorted(sources().items()):
        folder = relative.split(os.sep)[0]
        if folder not in MAY_IMPORT:
            continue
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] != "verl_npd" or len(parts) < 2:
                continue
            target = parts[1]
            if target != folder and target not in MAY_IMPORT[folder]:
                wrong.append(f"{relative} imports {module}")
    assert not wrong, wrong


def test_math_modules_import_only_torch():
    for relative in MATH_MODULES:
        roots = {module.split(".")[0] for module in imported_modules(os.path.join(PACKAGE, relative))}
        assert roots - set(sys.stdlib_module_names) <= {"torch", "verl_npd"}, relative
