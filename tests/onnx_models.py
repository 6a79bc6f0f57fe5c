"""Saving the small ONNX models the tests build with onnx.helper (one place for opset and checks)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import onnx
from onnx import helper

OPSET = 17
IR_VERSION = 8  # what the installed ONNX Runtime reads


def save_graph(graph: onnx.GraphProto, path: Path, metadata: Optional[dict[str, str]] = None) -> Path:
    """Wrap a graph into a checked model (opset 17, IR 8), with optional metadata, and save it."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
