"""Inside ``edgecv.engine`` (the layer order itself is an import-linter contract, tests/test_layers.py): no edgecv
module is imported inside a function (no cycle held together that way), the optional third-party packages
(tensorrt, pycuda, onnxruntime, cupy, onnx) only inside functions so that edgecv imports without them, and no private
name is imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

ENGINE = REPO / "edgecv" / "engine"
LAZY_OK = ("tensorrt", "pycuda", "onnxruntime", "cupy", "onnx")  # onnx: edgecv[tools] (model dynamic-batch)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in ``path``; relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_functions = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for inner in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["edgecv" if node.level else (node.module or "")]
        else:
            continue
        out.extend((name, node.lineno, id(node) in in_functions) for name in names)
    return out


@pytest.mark.parametrize("module", sorted(p.stem for p in ENGINE.glob("*.py")))
def test_no_edgecv_import_inside_functions_and_optional_packages_only_there(module: str) -> None:
    for name, line, in_function in imports(ENGINE / f"{module}.py"):
        where = f"edgecv/engine/{module}.py:{line}: {name}"
        if in_function:
            assert name.split(".")[0] != "edgecv", f"{where}: an edgecv module imported inside a function"
        else:
            assert name.split(".")[0] not in LAZY_OK, f"{where}: optional package imported at module level"


def test_no_private_names_cross_modules() -> None:
    """``from edgecv.engine.x import _name`` would tie modules by their internals."""
    for path in [*ENGINE.glob("*.py"), *(REPO / "edgecv").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("edgecv.engine", "engine")):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path}:{node.lineno}: imports private {private} from {node.module}"


def test_no_import_inside_functions_anywhere_but_optional_packages() -> None:
    """Outside the engine too: every import at module level, except optional dependencies, each said so."""
    for path in sorted((REPO / "edgecv").rglob("*.py")):
        source = path.read_text(encoding="utf-8").splitlines()
        for name, line, in_function in imports(path):
            if not in_function:
                continue
            where = f"{path.relative_to(REPO)}:{line}: {name}"
            assert name.split(".")[0] in (*LAZY_OK, "motmetrics"), f"{where}: imported inside a function"
            assert "#" in source[line - 1], f"{where}: a lazy import says why (comment)"
