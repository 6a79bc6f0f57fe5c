"""Fixed batch -> dynamic batch: `edgecv model dynamic-batch IN.onnx OUT.onnx`, and the check that it is right.

An exported model often has its batch baked in: inputs and outputs of (1, ...), Reshape shapes (1, 85, -1), a
Resize to sizes (1, C, H, W), and, in a dynamically quantized model (ONNX Runtime's ``quantize_dynamic``), one
quantization range computed over the whole activation tensor (``DynamicQuantizeLinear``), which at batch N would
make every frame's result depend on the other frames of its batch.

:func:`make_dynamic` follows the tensors that carry the batch (axis 0 of the inputs) through the graph, rewrites
what bakes it in (the inputs' and outputs' dimension 0 becomes ``batch``; a Reshape, Expand or Slice constant
that names the batch gets 0, -1, 1 or "to the end"; a Resize by sizes becomes a Resize by scales; a
``DynamicQuantizeLinear`` feeding ``ConvInteger`` computes its range per frame, the convolution its zero point
per frame, the integer arithmetic unchanged) and refuses, naming the node, what it cannot rewrite (an operation
along the batch axis, a Reshape that merges the batch with other dimensions, a constant of batch 1 joined to the
frames' tensors, ...). :func:`check_batching` then runs the original and the rewritten model with ONNX Runtime on
real frames, one at a time and N stacked, and :func:`dynamic_batch` writes the model only when every frame's
outputs equal the original model's on that frame.

The ``onnx`` package is optional (``pip install 'edgecv[tools]'``); it is imported only here, when used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np

from edgecv import EdgecvError
from edgecv.engine.backend import DYNAMIC_MAX_BATCH, OnnxRuntimeBackend, format_shape
from edgecv.engine.registry import build_detector

BATCH_DIM = "batch"
"""Name of the dynamic batch dimension written into the model."""

RTOL, ATOL = 1e-5, 1e-5
"""How close a frame's outputs in a batch must be to the original model's on that frame alone."""

FRAME_STEP = 25
"""Frames of the check video taken this many frames apart (different frames, not one repeated)."""

_INT64_MAX = int(np.iinfo(np.int64).max)
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}
_ABSENT = object()  # a parameter the node does not give (its default applies)
_RUNTIME = object()  # a parameter computed at run time (not a constant)


def _import_onnx() -> Any:
    """The ``onnx`` module, or an :class:`EdgecvError` naming the extra that installs it."""
    try:
        import onnx  # lazy: an optional package (edgecv[tools]); edgecv runs without it
        import onnx.reference  # lazy: the same optional package (constant folding of shape subgraphs)
    except ImportError as exc:
        raise EdgecvError("edgecv model dynamic-batch needs the onnx package: pip install 'edgecv[tools]'") from exc
    return onnx


def _refuse(node: Any, why: str) -> EdgecvError:
    return EdgecvError(f"node {node.name or node.output[0]!r} ({node.op_type}) {why}")


def _attr(node: Any, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = _get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


_ATTRIBUTE_FIELDS = {1: "f", 2: "i", 3: "s", 4: "t", 5: "g", 6: "floats", 7: "ints", 8: "strings", 9: "tensors",
                     10: "graphs", 11: "sparse_tensor", 12: "sparse_tensors", 13: "tp", 14: "type_protos"}


def _get_attribute_value(a: Any) -> Any:
    """An attribute's value (what ``onnx.helper.get_attribute_value`` gives; repeated fields as lists)."""
    if a.type not in _ATTRIBUTE_FIELDS:
        return None
    value = getattr(a, _ATTRIBUTE_FIELDS[a.type])
    return list(value) if a.type in (6, 7, 8, 9, 10, 12, 14) else value


def _set_attr(node: Any, name: str, ints: Sequence[int]) -> None:
    for a in node.attribute:
        if a.name == name:
            del a.ints[:]
            a.ints.extend(int(i) for i in ints)
            return


def _dims(value_info: Any) -> Optional[tuple[Optional[int], ...]]:
    """A tensor's static shape (None for an unknown dimension), or None when its shape is unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def _fmt(value: Any) -> str:
    if value is None:
        return "(?)"
    return "(" + ", ".join("?" if v is None else str(int(v)) for v in np.asarray(value).reshape(-1).tolist()) + \
        ("," if np.asarray(value).size == 1 else "") + ")"


def _subgraph_names(node: Any) -> set[str]:
    """Every tensor name the node's subgraphs (If, Loop, Scan) read."""
    names: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == 5 else list(a.graphs) if a.type == 10 else []):
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_names(n)
    return names


class _Graph:
    """The model being rewritten: producers and consumers of its tensors, their constant values, static shapes."""

    def __init__(self, onnx: Any, model: Any) -> None:
        self.onnx = onnx
        self.model = model
        self.g = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self._added: dict[tuple[str, bytes, str], str] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the graph after a change: initializers, producers, consumers, inferred shapes."""
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.names = {*self.inits, *self.producer, *(v.name for v in self.g.input)}
        self._values: dict[str, Optional[np.ndarray]] = {}
        try:
            inferred = self.onnx.shape_inference.infer_shapes(self.model)
        except Exception as exc:  # onnx raises its own InferenceError, ValidationError, ...
            raise EdgecvError(f"ONNX shape inference fails on the model: {str(exc).strip().splitlines()[0]}") from exc
        self.inferred = inferred.graph
        infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        self.shapes = {v.name: _dims(v) for v in infos}

    def shape(self, name: str) -> Optional[tuple[Optional[int], ...]]:
        if name in self.inits:
            return tuple(self.inits[name].dims)
        return self.shapes.get(name)

    def fresh(self, base: str) -> str:
        """A tensor name not used in the graph yet."""
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def add_const(self, value: np.ndarray, base: str) -> str:
        """A new initializer holding ``value`` (one per distinct value and base name)."""
        value = np.asarray(value)
        key = (base, value.tobytes(), str(value.dtype))
        if key not in self._added:
            name = self.fresh(base)
            self.g.initializer.append(self.onnx.numpy_helper.from_array(value, name))
            self.inits[name] = self.g.initializer[-1]
            self._added[key] = name
        return self._added[key]

    def node(self, op: str, inputs: Sequence[str], base: str, **attrs: Any) -> Any:
        """A new node with one output named after ``base``."""
        out = self.fresh(base)
        return self.onnx.helper.make_node(op, list(inputs), [out], name=out, **attrs)

    def const(self, name: str) -> Optional[np.ndarray]:
        """The value of a tensor that does not depend on the inputs (an initializer, a Constant node or a small
        subgraph of constants, evaluated), else None."""
        if not name:
            return None
        if name not in self._values:
            self._values[name] = self._evaluate(name)
        return self._values[name]

    def _evaluate(self, name: str) -> Optional[np.ndarray]:
        if name in self.inits:
            return self.onnx.numpy_helper.to_array(self.inits[name])
        cone = self._constant_cone(name)
        if cone is None:
            return None
        order = {id(n): k for k, n in enumerate(self.g.node)}
        nodes = sorted(cone, key=lambda n: order[id(n)])
        used = {i for n in nodes for i in n.input if i in self.inits}
        helper = self.onnx.helper
        graph = helper.make_graph(nodes, "constant", [], [helper.make_empty_tensor_value_info(name)],
                                  initializer=[self.inits[i] for i in sorted(used)])
        sub = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        try:
            return np.asarray(self.onnx.reference.ReferenceEvaluator(sub).run(None, {})[0])
        except Exception:  # an operator the reference evaluator lacks: treated as not constant (checked at run time)
            return None

    def _constant_cone(self, name: str, limit: int = 64) -> Optional[list[Any]]:
        """The nodes computing ``name`` from initializers and Constant nodes only, or None (a graph input, a
        random or control-flow operator, or more than ``limit`` nodes)."""
        cone: dict[int, Any] = {}
        todo = [name]
        while todo:
            t = todo.pop()
            if not t or t in self.inits:
                continue
            node = self.producer.get(t)
            if node is None or node.op_type in _NONDETERMINISTIC or any(a.type in (5, 10) for a in node.attribute):
                return None
            if id(node) not in cone:
                cone[id(node)] = node
                todo.extend(node.input)
            if len(cone) > limit:
                return None
        return list(cone.values())

    def param(self, node: Any, attr: str, index: int) -> Any:
        """A node's parameter given as an attribute (older opsets) or a constant input: its value as an array,
        ``_ABSENT`` when not given, ``_RUNTIME`` when computed at run time."""
        value = _attr(node, attr)
        if value is not None:
            return np.asarray(value)
        if index < len(node.input) and node.input[index]:
            v = self.const(node.input[index])
            return _RUNTIME if v is None else v
        return _ABSENT


@dataclass
class _Context:
    batch: int  # the fixed batch of the model's inputs (1 when already dynamic)
    batched: set[str] = field(default_factory=set)  # tensors whose axis 0 is the batch
    shaped: set[str] = field(default_factory=set)  # tensors computed from the batch's shapes (Shape, Size)
    changes: list[str] = field(default_factory=list)


def _trace(g: _Graph, inputs: Sequence[str], ctx: _Context) -> None:
    """Which tensors carry the batch (a node with a batched input has batched outputs) and which are computed
    from shapes at run time (Shape, Size of a batched tensor, and what is made from them)."""
    ctx.batched, ctx.shaped = set(inputs), set()
    for node in g.g.node:
        ins = {i for i in node.input if i} | _subgraph_names(node)
        batched, shaped = bool(ins & ctx.batched), bool(ins & ctx.shaped)
        if node.op_type in ("Shape", "Size"):
            batched, shaped = False, batched or shaped
        outputs = {o for o in node.output if o}
        if batched:
            ctx.batched |= outputs
        elif shaped:
            ctx.shaped |= outputs


# ----------------------------------------------------------------------------------------------------------------
# Dynamic quantization, per frame: DynamicQuantizeLinear -> ConvInteger with one range per frame, exactly as the
# model computes it for a batch of one (ONNX Runtime's min/max, scale, zero point and rounding).


def _quantize_per_frame(g: _Graph, ctx: _Context) -> None:
    """Rewrite every DynamicQuantizeLinear on a batched tensor and the ConvInteger nodes it feeds."""
    dqls = [n for n in g.g.node if n.op_type == "DynamicQuantizeLinear" and n.input[0] in ctx.batched]
    if not dqls:
        return
    if g.opset < 13:
        raise _refuse(dqls[0], f"quantizes the whole batch with one range, and a per-frame range needs opset 13 "
                               f"(QuantizeLinear per axis); the model has opset {g.opset}")
    convs: dict[int, Any] = {}
    for dql in dqls:
        for conv in _dql_convs(g, dql):
            convs[id(conv)] = conv
    masks: dict[tuple, str] = {}
    new: list[Any] = []
    dql_ids = {id(n) for n in dqls}
    for n in g.g.node:
        if id(n) in dql_ids:
            new.extend(_per_frame_range(g, n))
        elif id(n) in convs:
            new.extend(_per_frame_conv(g, n, masks))
        else:
            new.append(n)
    del g.g.node[:]
    g.g.node.extend(new)
    ctx.changes.append(f"{len(dqls)} DynamicQuantizeLinear: quantization range per frame (was: per batch); "
                       f"{len(convs)} ConvInteger: input zero point per frame")
    g.refresh()


def _dql_convs(g: _Graph, dql: Any) -> list[Any]:
    """The ConvInteger nodes a DynamicQuantizeLinear feeds (its values and zero point); anything else is refused."""
    q, _, zp = dql.output
    convs: dict[int, Any] = {}
    for n in g.consumers.get(q, []) + g.consumers.get(zp, []):
        ok = n.op_type == "ConvInteger" and n.input[0] == q and len(n.input) > 2 and n.input[2] == zp
        if not ok:
            raise _refuse(dql, f"quantizes the whole batch with one range (a frame's result would depend on the "
                               f"other frames) and feeds {n.op_type} {n.name or n.output[0]!r}; only ConvInteger "
                               f"consumers can be given a range per frame")
        convs[id(n)] = n
    return list(convs.values())


def _per_frame_range(g: _Graph, dql: Any) -> list[Any]:
    """DynamicQuantizeLinear(x) computed per frame: min and max over each frame, scale = (max(0, max) -
    min(0, min)) / 255 (1 when both are 0), zero point = round(clip(-min / scale, 0, 255)), then QuantizeLinear
    per axis 0; outputs keep their names (scale and zero point become (N, 1, ..., 1))."""
    x = dql.input[0]
    q, scale, zp = dql.output
    rank = len(g.shape(x) or ())
    if rank < 2:
        raise _refuse(dql, f"quantizes a tensor of unknown or too small rank ({rank}) per batch")
    base = (dql.name or q) + "/per_frame"
    zero = g.add_const(np.float32(0), "per_frame_zero")
    top = g.add_const(np.float32(255), "per_frame_255")
    one = g.add_const(np.float32(1), "per_frame_one")
    flat = g.add_const(np.array([-1], np.int64), "per_frame_flat")
    lo, hi = _reduce(g, "ReduceMin", x, rank, base), _reduce(g, "ReduceMax", x, rank, base)
    nodes = [lo, hi]
    nodes.append(g.node("Min", [lo.output[0], zero], base + "/min"))
    nodes.append(g.node("Max", [hi.output[0], zero], base + "/max"))
    mn, mx = nodes[2].output[0], nodes[3].output[0]
    nodes.append(g.node("Sub", [mx, mn], base + "/range"))
    nodes.append(g.node("Div", [nodes[-1].output[0], top], base + "/scale0"))
    nodes.append(g.node("Equal", [mx, mn], base + "/empty"))
    nodes.append(g.onnx.helper.make_node("Where", [nodes[-1].output[0], one, nodes[-2].output[0]], [scale],
                                         name=base + "/scale"))
    nodes.append(g.node("Div", [mn, scale], base + "/min_over_scale"))
    nodes.append(g.node("Sub", [zero, nodes[-1].output[0]], base + "/zp0"))
    nodes.append(g.node("Clip", [nodes[-1].output[0], zero, top], base + "/zp_clipped"))
    nodes.append(g.node("Round", [nodes[-1].output[0]], base + "/zp_rounded"))
    nodes.append(g.onnx.helper.make_node("Cast", [nodes[-1].output[0]], [zp], name=base + "/zp",
                                         to=g.onnx.TensorProto.UINT8))
    scales = g.node("Reshape", [scale, flat], base + "/scales")
    points = g.node("Reshape", [zp, flat], base + "/zero_points")
    quant = g.onnx.helper.make_node("QuantizeLinear", [x, scales.output[0], points.output[0]], [q],
                                    name=base + "/quantize", axis=0)
    return nodes + [scales, points, quant]


def _reduce(g: _Graph, op: str, x: str, rank: int, base: str) -> Any:
    """ReduceMin/ReduceMax over every axis but the batch, dimensions kept (axes as input from opset 18)."""
    axes = list(range(1, rank))
    if g.opset >= 18:
        return g.node(op, [x, g.add_const(np.array(axes, np.int64), "per_frame_axes")], f"{base}/{op}", keepdims=1)
    return g.node(op, [x], f"{base}/{op}", axes=axes, keepdims=1)


def _per_frame_conv(g: _Graph, conv: Any, masks: dict[tuple, str]) -> list[Any]:
    """ConvInteger(x, w, x_zp, w_zp) with a zero point per frame, in exact integer arithmetic:
    ConvInteger(x padded with x_zp, w, 0, w_zp) - x_zp * sum(w - w_zp) per output channel."""
    q, w, zp = conv.input[0], conv.input[1], conv.input[2]
    wzp = conv.input[3] if len(conv.input) > 3 else ""
    if _attr(conv, "auto_pad", "NOTSET") != "NOTSET":
        raise _refuse(conv, "uses auto_pad; only explicit pads can be given a zero point per frame")
    weights, wzero = g.const(w), (g.const(wzp) if wzp else np.zeros((), np.uint8))
    if weights is None or wzero is None:
        raise _refuse(conv, "has weights that are not constant")
    rank = weights.ndim
    centred = weights.astype(np.int64) - (wzero.astype(np.int64).reshape((-1,) + (1,) * (rank - 1)) if wzero.ndim
                                          else wzero.astype(np.int64))
    sums = centred.sum(axis=tuple(range(1, rank))).astype(np.int32).reshape((1, -1) + (1,) * (rank - 2))
    base = (conv.name or conv.output[0]) + "/per_frame"
    nodes: list[Any] = []
    pads = list(_attr(conv, "pads", [0] * (2 * (rank - 2))))
    attrs = {a.name: _get_attribute_value(a) for a in conv.attribute if a.name != "pads"}
    x = q
    if any(pads):
        nodes += _pad_with_zero_point(g, conv, q, zp, pads, masks, base)
        x = nodes[-1].output[0]
    inputs = [x, w, "", wzp] if wzp else [x, w]
    raw = g.node("ConvInteger", inputs, base + "/conv", **attrs)
    zp32 = g.node("Cast", [zp], base + "/zp_int32", to=g.onnx.TensorProto.INT32)
    corr = g.node("Mul", [zp32.output[0], g.add_const(sums, base + "/weight_sums")], base + "/correction")
    out = g.onnx.helper.make_node("Sub", [raw.output[0], corr.output[0]], [conv.output[0]], name=base + "/output")
    return nodes + [raw, zp32, corr, out]


def _pad_with_zero_point(g: _Graph, conv: Any, q: str, zp: str, pads: list[int], masks: dict[tuple, str],
                         base: str) -> list[Any]:
    """x padded with each frame's zero point (what ConvInteger pads with): Pad with 0, then Where(border, zp, x).
    The border mask is made from constants (ConstantOfShape, Pad), so ONNX Runtime folds it when it loads."""
    spatial = (g.shape(q) or ())[2:]
    if not spatial or None in spatial:
        raise _refuse(conv, "pads an input of unknown size; a zero point per frame needs its size")
    n = len(spatial)
    full = np.array([0, 0, *pads[:n], 0, 0, *pads[n:]], np.int64)
    nodes: list[Any] = []
    key = (tuple(spatial), tuple(pads))
    if key not in masks:
        zeros = g.node("ConstantOfShape", [g.add_const(np.array([1, 1, *spatial], np.int64), "per_frame_mask_shape")],
                       "per_frame_mask_zeros", value=g.onnx.numpy_helper.from_array(np.zeros(1, np.uint8)))
        border = g.node("Pad", [zeros.output[0], g.add_const(full, "per_frame_pads"),
                                g.add_const(np.uint8(1), "per_frame_one_u8")], "per_frame_mask_u8")
        mask = g.node("Cast", [border.output[0]], "per_frame_mask", to=g.onnx.TensorProto.BOOL)
        nodes += [zeros, border, mask]
        masks[key] = mask.output[0]
    padded = g.node("Pad", [q, g.add_const(full, "per_frame_pads"), g.add_const(np.uint8(0), "per_frame_zero_u8")],
                    base + "/padded0")
    where = g.node("Where", [masks[key], zp, padded.output[0]], base + "/padded")
    return nodes + [padded, where]


# ----------------------------------------------------------------------------------------------------------------
# Constants that name the batch, and operations along the batch axis.

Decide = Callable[[np.ndarray, bool], Optional[int]]


def _fix_first(g: _Graph, ctx: _Context, node: Any, index: int, decide: Decide, what: str) -> None:
    """Rewrite the first element of a shape-like input: a constant (``decide(value, True)`` gives the new first
    element or None to keep it), or a Concat whose first operand is a constant (``decide(value, False)``);
    computed at run time otherwise (left as it is)."""
    name = node.input[index] if index < len(node.input) else ""
    if not name:
        return
    value = g.const(name)
    target, at = node, index
    if value is None:
        src = g.producer.get(name)
        if src is None or src.op_type != "Concat" or not src.input or g.const(src.input[0]) is None:
            return
        target, at, value = src, 0, g.const(src.input[0])
    flat = np.asarray(value).reshape(-1)
    if flat.size == 0:
        return
    first = decide(flat, target is node)
    if first is None:
        return
    new = flat.copy()
    new[0] = first
    target.input[at] = g.add_const(new.reshape(np.asarray(value).shape), f"{target.input[at]}_dynamic_batch")
    ctx.changes.append(f"{node.op_type} {node.name or node.output[0]!r}: {what} {_fmt(flat)} -> {_fmt(new)}")


def _rule_reshape(g: _Graph, ctx: _Context, node: Any) -> None:
    if node.input[0] not in ctx.batched:
        return
    src, out = g.shape(node.input[0]), g.shape(node.output[0])
    known = bool(src and out and None not in src and None not in out)
    if known and (out[0] != ctx.batch or int(np.prod(src[1:])) != int(np.prod(out[1:]))):
        raise _refuse(node, f"reshapes {_fmt(src)} to {_fmt(out)}: the batch would mix with other dimensions")
    allowzero = int(_attr(node, "allowzero", 0))

    def decide(v: np.ndarray, whole: bool) -> Optional[int]:
        if v[0] == -1 or (v[0] == 0 and not allowzero):
            return None
        if v[0] != ctx.batch:
            raise _refuse(node, f"reshapes to {_fmt(v)}, which does not start with the batch ({ctx.batch})")
        if not allowzero:
            return 0  # 0: copy the input's dimension 0 (the batch)
        if whole and -1 not in v[1:]:
            return -1
        raise _refuse(node, f"reshapes to {_fmt(v)} with allowzero=1 and another -1: the batch cannot be inferred")

    _fix_first(g, ctx, node, 1, decide, "shape")


def _rule_expand(g: _Graph, ctx: _Context, node: Any) -> None:
    if node.input[0] not in ctx.batched:
        return

    def decide(v: np.ndarray, whole: bool) -> Optional[int]:
        if v[0] == 1:
            return None  # broadcasts to any batch
        if v[0] == ctx.batch:
            return 1
        raise _refuse(node, f"expands the batch to {int(v[0])}")

    _fix_first(g, ctx, node, 1, decide, "shape")


def _rule_tile(g: _Graph, ctx: _Context, node: Any) -> None:
    repeats = g.param(node, "repeats", 1)
    if node.input[0] in ctx.batched and isinstance(repeats, np.ndarray) and repeats.reshape(-1)[0] != 1:
        raise _refuse(node, f"repeats the batch {int(repeats.reshape(-1)[0])} times: frames would mix")


def _axes(values: Any, rank: Optional[int]) -> list[int]:
    out = [int(a) for a in np.asarray(values).reshape(-1)]
    return [a + rank if a < 0 and rank else a for a in out]


def _slice_of_batch(g: _Graph, node: Any) -> Optional[tuple[int, int, int, int, np.ndarray]]:
    """(index among the sliced axes, start, end, step, ends) of the batch axis when a Slice with constant
    parameters slices it, else None."""
    starts, ends = g.param(node, "starts", 1), g.param(node, "ends", 2)
    axes, steps = g.param(node, "axes", 3), g.param(node, "steps", 4)
    if any(p is _RUNTIME for p in (starts, ends, axes, steps)) or starts is _ABSENT:
        return None
    rank = len(g.shape(node.input[0]) or ()) or None
    listed = list(range(len(starts))) if axes is _ABSENT else _axes(axes, rank)
    if 0 not in listed:
        return None
    k = listed.index(0)
    step = 1 if steps is _ABSENT else int(np.asarray(steps).reshape(-1)[k])
    return k, int(np.asarray(starts).reshape(-1)[k]), int(np.asarray(ends).reshape(-1)[k]), step, np.asarray(ends)


def _rule_slice(g: _Graph, ctx: _Context, node: Any) -> None:
    found = _slice_of_batch(g, node) if node.input[0] in ctx.batched else None
    if found is None:
        return
    k, start, end, step, ends = found
    if start != 0 or step != 1 or end < ctx.batch:
        raise _refuse(node, f"slices the batch axis ({start}:{end}:{step}): frames would be dropped")
    if end >= _INT64_MAX // 2:
        return
    new = ends.reshape(-1).copy()
    new[k] = _INT64_MAX
    if _attr(node, "ends") is not None:
        _set_attr(node, "ends", new)
    else:
        node.input[2] = g.add_const(new.astype(ends.dtype), f"{node.input[2]}_dynamic_batch")
    ctx.changes.append(f"Slice {node.name or node.output[0]!r}: axis 0 ends at {end} -> at the end")


def _rule_resize(g: _Graph, ctx: _Context, node: Any) -> None:
    """A Resize to constant sizes (batch included) becomes a Resize by the same scales (what ONNX Runtime computes
    from sizes), when those scales give back exactly the sizes."""
    sizes = g.const(node.input[3]) if len(node.input) > 3 else None
    if node.input[0] not in ctx.batched or sizes is None or sizes.size == 0:
        return
    axes = _attr(node, "axes")
    if axes is not None and 0 in _axes(axes, len(g.shape(node.input[0]) or ()) or None):
        raise _refuse(node, "resizes the batch axis")
    if axes is None:
        _resize_by_scales(g, ctx, node, sizes)


def _resize_by_scales(g: _Graph, ctx: _Context, node: Any, sizes: np.ndarray) -> None:
    src = g.shape(node.input[0])
    if not src or None in src or _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise _refuse(node, f"resizes to constant sizes {_fmt(sizes)} that name the batch, and cannot be rewritten "
                            "to scales (unknown input size or a keep_aspect_ratio_policy)")
    scales = sizes.astype(np.float32) / np.asarray(src, np.float32)
    if sizes[0] != ctx.batch or not np.array_equal(np.floor(np.asarray(src, np.float32) * scales), sizes):
        raise _refuse(node, f"resizes to constant sizes {_fmt(sizes)} that cannot be written as scales exactly")
    node.input[2] = g.add_const(scales, f"{node.input[3]}_scales")
    del node.input[3:]
    ctx.changes.append(f"Resize {node.name or node.output[0]!r}: sizes {_fmt(sizes)} -> scales "
                       f"({', '.join(f'{s:g}' for s in scales)})")


def _rule_pad(g: _Graph, ctx: _Context, node: Any) -> None:
    pads = g.param(node, "pads", 1)
    if node.input[0] not in ctx.batched or not isinstance(pads, np.ndarray):
        return
    axes = g.param(node, "axes", 3)
    if isinstance(axes, np.ndarray):
        listed = _axes(axes, len(g.shape(node.input[0]) or ()) or None)
        k = listed.index(0) if 0 in listed else None
    else:
        listed, k = [], 0
    flat = pads.reshape(-1)
    n = len(listed) if listed else flat.size // 2
    if k is not None and (flat[k] != 0 or flat[k + n] != 0):
        raise _refuse(node, "pads the batch axis: frames would be added")


def _rule_transpose(g: _Graph, ctx: _Context, node: Any) -> None:
    perm = _attr(node, "perm")
    rank = len(g.shape(node.input[0]) or ())
    if node.input[0] in ctx.batched and ((perm is None and rank > 1) or (perm is not None and perm[0] != 0)):
        raise _refuse(node, f"moves the batch axis (perm {perm if perm is not None else 'reversed'})")


def _rule_squeeze(g: _Graph, ctx: _Context, node: Any) -> None:
    if node.input[0] not in ctx.batched:
        return
    axes = g.param(node, "axes", 1)
    if axes is _ABSENT and node.op_type == "Squeeze":
        raise _refuse(node, "squeezes every dimension of size 1, the batch included")
    if isinstance(axes, np.ndarray):
        rank = len(g.shape(node.output[0] if node.op_type == "Unsqueeze" else node.input[0]) or ()) or None
        if 0 in _axes(axes, rank):
            raise _refuse(node, f"{'removes' if node.op_type == 'Squeeze' else 'inserts'} a dimension at the batch "
                                "axis")


# op -> its default axis (None: required); a batched data input handled along axis 0 mixes frames
_AXIS_OPS: dict[str, Optional[int]] = {
    "Concat": None, "Split": 0, "Gather": 0, "GatherElements": 0, "Flatten": 1, "ArgMax": 0, "ArgMin": 0,
    "TopK": -1, "LpNormalization": -1, "LayerNormalization": -1, "ScatterElements": 0, "Compress": None,
    "Unique": None, "Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "CumSum": None,
}
_REDUCE_OPS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


def _rule_axis(g: _Graph, ctx: _Context, node: Any) -> None:
    if node.input[0] not in ctx.batched:
        return
    default = _AXIS_OPS[node.op_type]
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and g.opset < 13:
        default = 1  # before opset 13: the input is seen as 2-D (axes before `axis`, axes from it)
    axis = g.param(node, "axis", 1) if node.op_type == "CumSum" else _attr(node, "axis", default)
    if axis is None or axis is _ABSENT:
        if node.op_type in ("Compress", "Unique"):
            raise _refuse(node, "works on the flattened tensor, the batch included")
        return
    if axis is _RUNTIME:
        return
    rank = len(g.shape(node.input[0]) or ()) or None
    if _axes(axis, rank) == [0]:
        raise _refuse(node, "works along the batch axis (axis 0): frames would mix")
    if node.op_type == "Concat":
        _concat_constants(g, ctx, node)


def _concat_constants(g: _Graph, ctx: _Context, node: Any) -> None:
    for i in node.input:
        if i and i not in ctx.batched and i not in ctx.shaped and len(g.shape(i) or ()) > 0:
            raise _refuse(node, f"joins the frames' tensors with {i!r}, whose batch is fixed at {ctx.batch}")


def _rule_reduce(g: _Graph, ctx: _Context, node: Any) -> None:
    if node.input[0] not in ctx.batched:
        return
    axes = g.param(node, "axes", 1)
    if axes is _RUNTIME:
        return
    empty = axes is _ABSENT or np.asarray(axes).size == 0
    if empty and not _attr(node, "noop_with_empty_axes", 0):
        raise _refuse(node, "reduces over every axis, the batch included: frames would mix")
    if not empty and 0 in _axes(axes, len(g.shape(node.input[0]) or ()) or None):
        raise _refuse(node, "reduces over the batch axis: frames would mix")


def _rule_matmul(g: _Graph, ctx: _Context, node: Any) -> None:
    a, b = node.input[0], node.input[1]
    if node.op_type == "Gemm":
        mixes = (a in ctx.batched and bool(_attr(node, "transA", 0))) or b in ctx.batched
    else:  # MatMul: the batch is a row of a 2-D right operand, or the only axis of a 1-D left one
        mixes = (b in ctx.batched and len(g.shape(b) or (0, 0, 0)) <= 2) or (
            a in ctx.batched and len(g.shape(a) or (0, 0)) == 1)
    if mixes:
        raise _refuse(node, "multiplies along the batch axis: frames would mix")


_RULES: dict[str, Callable[[_Graph, _Context, Any], None]] = {
    "Reshape": _rule_reshape, "Expand": _rule_expand, "Tile": _rule_tile, "Slice": _rule_slice,
    "Resize": _rule_resize, "Pad": _rule_pad, "Transpose": _rule_transpose, "Squeeze": _rule_squeeze,
    "Unsqueeze": _rule_squeeze, "MatMul": _rule_matmul, "Gemm": _rule_matmul,
    **{op: _rule_axis for op in _AXIS_OPS}, **{op: _rule_reduce for op in _REDUCE_OPS},
}


def _rewrite_nodes(g: _Graph, ctx: _Context) -> None:
    """Apply the rules to every node reading a batched tensor, and check that its batched outputs keep the batch
    on axis 0 (by the shapes ONNX infers for the fixed batch)."""
    for node in g.g.node:
        if not any(i in ctx.batched for i in node.input):
            if any(n in ctx.batched for n in _subgraph_names(node)):
                raise _refuse(node, "has a subgraph reading the frames' tensors (control flow is not supported)")
            continue
        if any(a.type in (5, 10) for a in node.attribute):
            raise _refuse(node, "has a subgraph reading the frames' tensors (control flow is not supported)")
        if node.domain in ("", "ai.onnx") and node.op_type in _RULES:
            _RULES[node.op_type](g, ctx, node)
        for out in node.output:
            shape = g.shape(out) if out in ctx.batched else None
            if shape is not None and (len(shape) == 0 or shape[0] not in (ctx.batch, None)):
                raise _refuse(node, f"gives {out!r} the shape {_fmt(shape)}: the batch axis is gone")


# ----------------------------------------------------------------------------------------------------------------
# The whole rewrite.


@dataclass(frozen=True)
class Rewrite:
    """What :func:`make_dynamic` did."""

    batch: int  # the model's fixed batch (1 when it was already dynamic)
    already_dynamic: bool  # every input's dimension 0 was dynamic already
    inputs: tuple[str, ...]  # "images (1, 3, 416, 416) -> (batch, 3, 416, 416)"
    changes: tuple[str, ...]  # one line per rewrite inside the graph


def _graph_inputs(g: _Graph) -> list[Any]:
    return [v for v in g.g.input if v.name not in g.inits]


def _fix_inputs(g: _Graph) -> tuple[int, bool, dict[str, tuple[str, str]]]:
    """The fixed batch of the inputs (all must agree), whether they are dynamic already, and for each input the
    name of its batch dimension and its shape as it was; dynamic inputs get the batch 1 for the analysis."""
    inputs = _graph_inputs(g)
    if not inputs:
        raise EdgecvError("the model has no input")
    batches, names = set(), {}
    for v in inputs:
        dims = v.type.tensor_type.shape.dim
        if not v.type.HasField("tensor_type") or len(dims) == 0:
            raise EdgecvError(f"input {v.name!r} has no batch dimension (a scalar or unknown shape)")
        d0 = dims[0]
        names[v.name] = (d0.dim_param or BATCH_DIM, _describe(v))
        if d0.HasField("dim_value") and d0.dim_value > 0:
            batches.add(d0.dim_value)
        else:
            d0.dim_value = 1
    if len(batches) > 1:
        raise EdgecvError(f"the inputs disagree on the batch: {', '.join(b for _, b in names.values())}")
    return (next(iter(batches)) if batches else 1), not batches, names


def _describe(v: Any) -> str:
    dims = v.type.tensor_type.shape.dim
    return f"{v.name} (" + ", ".join(d.dim_param or str(d.dim_value) if (d.dim_param or d.dim_value) else "?"
                                     for d in dims) + ")"


def _set_batch_dim(v: Any, name: str) -> None:
    d0 = v.type.tensor_type.shape.dim[0]
    d0.Clear()
    d0.dim_param = name


def _finish(g: _Graph, ctx: _Context, names: dict[str, tuple[str, str]]) -> tuple[str, ...]:
    """Inputs and batched outputs get the symbolic batch; value_info is what ONNX infers for the rewritten graph
    with the batch symbolic (tensors computed from run-time shapes left out); unused nodes and initializers go."""
    described = []
    for v in _graph_inputs(g):
        dim, before = names[v.name]
        _set_batch_dim(v, dim)
        described.append(f"{before} -> {_describe(v).split(' ', 1)[1]}")
    for v in g.g.output:
        if v.name in ctx.batched and len(v.type.tensor_type.shape.dim):
            _set_batch_dim(v, BATCH_DIM)
    ends = {v.name for v in [*g.g.input, *g.g.output]}
    del g.g.value_info[:]
    for v in g.inferred.value_info:
        if v.name in ends or v.name in ctx.shaped or v.name not in g.producer:
            continue
        if v.name in ctx.batched:
            if not len(v.type.tensor_type.shape.dim):
                continue
            _set_batch_dim(v, BATCH_DIM)
        g.g.value_info.append(v)
    _prune(g)
    return tuple(described)


def _prune(g: _Graph) -> None:
    """Remove nodes whose outputs nothing reads and initializers nothing reads (left by the rewrite)."""
    outputs = {v.name for v in g.g.output}
    while True:
        read = {i for n in g.g.node for i in (*n.input, *_subgraph_names(n))} | outputs
        dead = [n for n in g.g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.g.node.remove(n)
    listed = {v.name for v in g.g.input}
    keep = [t for t in g.g.initializer if t.name in read or t.name in listed]
    if len(keep) != len(g.g.initializer):
        del g.g.initializer[:]
        g.g.initializer.extend(keep)


def make_dynamic(model: Any, onnx: Optional[Any] = None) -> tuple[Any, Rewrite]:
    """Rewrite ``model`` (an ``onnx.ModelProto``, changed in place) to a dynamic batch dimension; an
    :class:`EdgecvError` names the node and why when the graph cannot be made dynamic. See the module docstring."""
    onnx = onnx or _import_onnx()
    del model.graph.value_info[:]  # inferred again for the rewritten graph (the old shapes name the fixed batch)
    g = _Graph(onnx, model)
    batch, already, names = _fix_inputs(g)
    g.refresh()
    ctx = _Context(batch)
    _trace(g, [v.name for v in _graph_inputs(g)], ctx)
    _quantize_per_frame(g, ctx)
    _trace(g, [v.name for v in _graph_inputs(g)], ctx)
    _rewrite_nodes(g, ctx)
    g.refresh()
    inputs = _finish(g, ctx, names)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise EdgecvError(f"the rewritten model fails the ONNX checker: {str(exc).strip().splitlines()[0]}") from exc
    return model, Rewrite(batch, already, inputs, tuple(ctx.changes))


# ----------------------------------------------------------------------------------------------------------------
# The check on real frames, and the command.


def sample_frames(video: Path, count: int, step: int = FRAME_STEP) -> list[np.ndarray]:
    """``count`` different frames of ``video``, ``step`` frames apart (closer when the video is short)."""
    cap = cv2.VideoCapture(str(video))
    frames: list[np.ndarray] = []
    try:
        if not cap.isOpened():
            raise EdgecvError(f"--video: cannot open {video}")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        every = max(1, min(step, total // count if total else step))
        index = 0
        while len(frames) < count:
            ok, image = cap.read()
            if not ok:
                break
            if index % every == 0:
                frames.append(image)
            index += 1
    finally:
        cap.release()
    if len(frames) < count:
        raise EdgecvError(f"--video: {video} has fewer than {count} frames to check the batch with")
    return frames


@dataclass(frozen=True)
class BatchCheck:
    """Each frame's outputs of the rewritten model, one frame at a time and all stacked, against the original
    model's on that frame alone: the largest absolute difference at each batch size."""

    frames: int
    max_abs_diff: dict[int, float]


def _compare(reference: list[list[np.ndarray]], outputs: list[np.ndarray], frame: int, batch: int,
             names: Sequence[str]) -> float:
    """Largest |difference| of frame ``frame``'s outputs (row ``frame % batch`` of ``outputs``) from the reference;
    an error when they are not close."""
    worst = 0.0
    row = frame % batch
    for name, ref, out in zip(names, reference[frame], outputs):
        got = out[row:row + 1]
        if got.shape != ref.shape:
            raise EdgecvError(f"check failed: output {name!r} at batch {batch} has shape {format_shape(out.shape)} "
                              f"for {batch} frames, the original {format_shape(ref.shape)} for one")
        diff = float(np.nanmax(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
        if not np.allclose(got, ref, rtol=RTOL, atol=ATOL, equal_nan=True):
            raise EdgecvError(f"check failed: output {name!r} of frame {frame + 1} at batch {batch} differs from the "
                              f"original model's by up to {diff:.3g}: the graph mixes the frames of a batch")
        worst = max(worst, diff)
    return worst


def check_batching(original: Path, rewritten: Path, inputs: np.ndarray, threads: Optional[int] = None) -> BatchCheck:
    """Run both models with ONNX Runtime on the CPU: the original on each frame of ``inputs`` (N, C, H, W) alone,
    the rewritten one on each alone and on all N stacked; every frame's outputs must equal the original's
    (``np.allclose``, rtol 1e-5, atol 1e-5)."""
    cpu = ["CPUExecutionProvider"]
    ref = OnnxRuntimeBackend(original, threads=threads, providers=cpu)
    new = OnnxRuntimeBackend(rewritten, threads=threads, providers=cpu)
    if new.input_shape[0] >= 0:
        raise EdgecvError(f"check failed: the rewritten model's input is still {format_shape(new.input_shape)}")
    n = len(inputs)
    reference = [ref.infer(inputs[i:i + 1]) for i in range(n)]
    diffs = {1: max(_compare(reference, new.infer(inputs[i:i + 1]), i, 1, new.output_names) for i in range(n))}
    stacked = new.infer(inputs)
    diffs[n] = max(_compare(reference, stacked, i, n, new.output_names) for i in range(n))
    return BatchCheck(n, diffs)


@dataclass(frozen=True)
class DynamicBatch:
    """The result of :func:`dynamic_batch`: what was rewritten, how it was checked, where it was written."""

    rewrite: Rewrite
    check: BatchCheck
    output: Path
    video: Path


def _load(onnx: Any, src: Path) -> Any:
    if not src.is_file():
        raise EdgecvError(f"model {src}: file not found" if not src.exists() else f"model {src}: not a file")
    try:
        return onnx.load(str(src))
    except Exception as exc:  # a protobuf DecodeError, a missing external data file, ...
        raise EdgecvError(f"model {src}: not an ONNX model onnx can read: {str(exc).strip().splitlines()[0]}") from exc


def rewrite_file(src: Path, dst: Path) -> Rewrite:
    """Rewrite ``src`` to a dynamic batch into ``dst`` (no check; see :func:`dynamic_batch`); a model already dynamic
    with nothing to rewrite is copied as it is. A graph that cannot be made dynamic is an :class:`EdgecvError`
    naming the node and why."""
    onnx = _import_onnx()
    try:
        model, report = make_dynamic(_load(onnx, src), onnx)
    except EdgecvError as exc:
        raise EdgecvError(f"{src.name}: cannot make the batch dynamic: {exc}") from None
    if report.already_dynamic and not report.changes:
        shutil.copyfile(src, dst)
    else:
        onnx.save(model, str(dst))
    return report


def dynamic_batch(src: Path, dst: Path, video: Path, batch: int = 4, family: str = "auto",
                  threads: Optional[int] = None) -> DynamicBatch:
    """`edgecv model dynamic-batch`: rewrite ``src`` into ``dst`` and check it on ``batch`` frames of ``video``
    (preprocessed by the model's adapter); ``dst`` is written only when the check passes (nothing is left behind
    otherwise)."""
    src, dst = Path(src), Path(dst)
    if not 2 <= batch <= DYNAMIC_MAX_BATCH:
        raise EdgecvError(f"--batch: expected 2 to {DYNAMIC_MAX_BATCH}, got {batch}")
    if dst.is_dir() or not dst.parent.is_dir():
        raise EdgecvError(f"{dst}: is a folder" if dst.is_dir() else f"{dst}: folder {dst.parent} not found")
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        report = rewrite_file(src, tmp)
        adapter = build_detector(src, family=family, backend="onnxruntime", threads=threads)
        inputs = np.stack([adapter.preprocess(image)[0] for image in sample_frames(video, batch)])
        try:
            check = check_batching(src, tmp, inputs, threads)
        except EdgecvError as exc:
            raise EdgecvError(f"{src.name}: {exc}; nothing written") from None
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return DynamicBatch(report, check, dst, video)
