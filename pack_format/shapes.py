"""Activation widths inferred from the access graph and the tensor shapes (docs/FORMAT.md §8.4).

Every activation is float32 `[rows, width]`. Each op's output width follows from its input
widths and its weights' shapes by one rule per op kind, so a runtime sizes its buffers from
the graph alone, whatever the architecture and whatever the activations are called.
The graph may be untrusted: every malformed reference or width disagreement is a FormatError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .errors import FormatError


class Shaped(Protocol):
    """Anything with a rows-first shape: a reader's TensorRecord or a compiler's SourceTensor."""

    @property
    def shape(self) -> tuple[int, ...]: ...


class _Op:
    """One op being inferred: its checked fields and the context for error messages."""

    def __init__(self, op: Any, where: str, cur: dict[str, int], inputs: set[str], tensors: Mapping[str, Shaped]):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str) or not isinstance(op.get("out"), str):
            raise FormatError(f"{where}: not an op map with a str `op` and `out`")
        self.kind: str = op["op"]
        self.where = f"{where} ({self.kind})"
        self.ins, self.ws = op.get("in"), op.get("w")
        if not (isinstance(self.ins, list) and all(isinstance(x, str) for x in self.ins)
                and isinstance(self.ws, list) and all(isinstance(x, str) for x in self.ws)):
            raise FormatError(f"{self.where}: `in` and `w` must be arrays of str")
        self.attrs = op.get("attrs") if isinstance(op.get("attrs"), dict) else {}
        self._cur, self._inputs, self._tensors = cur, inputs, tensors

    def arity(self, n_in: int, w_min: int, w_max: int) -> None:
        if len(self.ins) != n_in or not w_min <= len(self.ws) <= w_max:
            raise FormatError(f"{self.where}: takes {n_in} inputs and {w_min}-{w_max} weights, "
                              f"got {len(self.ins)} and {len(self.ws)}")

    def width(self, i: int) -> int:
        """Width of input i: the latest earlier write of that name."""
        name = self.ins[i]
        if name in self._cur:
            return self._cur[name]
        if name in self._inputs:
            raise FormatError(f"{self.where}: input {name!r} is a graph input (integers), not a float activation")
        raise FormatError(f"{self.where}: input {name!r} has no known width (no earlier op writes it)")

    def shape(self, i: int, ndim: int) -> tuple[int, ...]:
        """Shape of weight i, which must have `ndim` positive int dimensions."""
        return self.shape_of(self.ws[i], ndim)

    def shape_of(self, name: str, ndim: int) -> tuple[int, ...]:
        """Shape of the tensor `name` (a weight, or one an attribute names: a moe op's experts)."""
        t = self._tensors.get(name)
        if t is None:
            raise FormatError(f"{self.where}: weight {name!r} is not in the tensor table")
        shape = tuple(t.shape)
        if len(shape) != ndim or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise FormatError(f"{self.where}: weight {name!r} has shape {list(shape)}, expected {ndim} dimensions")
        return shape

    def agree(self, a: Any, b: Any, what: str) -> Any:
        if a != b:
            raise FormatError(f"{self.where}: {what}: {a} != {b}")
        return a


# ---- one rule per op kind: the width of `out` ----
def _embed(o: _Op) -> int:  # y[t] = emb[tokens[t]]: a row of the table [V, E]
    o.arity(1, 1, 1)
    return o.shape(0, 2)[1]


def _linear(o: _Op) -> int:  # W [out, in], optional bias [out]
    o.arity(1, 1, 2)
    rows, cols = o.shape(0, 2)
    o.agree(o.width(0), cols, f"input {o.ins[0]!r} width vs weight {o.ws[0]!r} columns")
    if len(o.ws) == 2:
        o.agree(o.shape(1, 1)[0], rows, f"bias {o.ws[1]!r} length vs weight {o.ws[0]!r} rows")
    return rows


def _rms_norm(o: _Op) -> int:  # w [n] scales each row, or each `group`-wide chunk of it
    o.arity(1, 1, 1)
    width, (n,) = o.width(0), o.shape(0, 1)
    group = o.attrs.get("group")
    if group is None:
        return o.agree(n, width, f"weight {o.ws[0]!r} length vs input {o.ins[0]!r} width")
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0 or width % group:
        raise FormatError(f"{o.where}: group {group!r} does not divide the input width {width}")
    o.agree(n, group, f"weight {o.ws[0]!r} length vs group")
    return width


def _same(o: _Op) -> int:  # rope, last_token, scale, softcap: the input's width
    o.arity(1, 0, 0)
    return o.width(0)


def _pair(o: _Op) -> int:  # add(a, b), swiglu(g, u), geglu(g, u): element-wise, so equal widths
    o.arity(2, 0, 0)
    return o.agree(o.width(0), o.width(1), f"inputs {o.ins[0]!r} and {o.ins[1]!r} widths")


def _attention(o: _Op) -> int:  # (q, k, v) -> out, as wide as q; k and v share the kv heads
    o.arity(3, 0, 0)
    o.agree(o.width(1), o.width(2), f"inputs {o.ins[1]!r} (k) and {o.ins[2]!r} (v) widths")
    return o.width(0)


def _glu_shapes(o: _Op, names: list[str], width: int, what: str) -> None:
    """gate [F, E], up [F, E], down [E, F] around an input of width E: one expert, or the shared one."""
    shapes = [o.shape_of(n, 2) for n in names]
    (f, e), (fu, eu), (ed, fd) = shapes
    o.agree(e, width, f"{what} gate {names[0]!r} columns vs input width")
    o.agree((fu, eu), (f, e), f"{what} up {names[1]!r} shape vs gate {names[0]!r}")
    o.agree((ed, fd), (width, f), f"{what} down {names[2]!r} shape vs [input width, gate rows]")


def _moe(o: _Op) -> int:  # router [n, E]; n experts of gate/up/down (attrs.experts); optional shared expert
    if len(o.ins) != 1 or len(o.ws) not in (1, 4, 5):
        raise FormatError(f"{o.where}: takes 1 input and 1, 4 or 5 weights, got {len(o.ins)} and {len(o.ws)}")
    width = o.width(0)
    experts = o.attrs.get("experts")
    if not isinstance(experts, list) or not experts:
        raise FormatError(f"{o.where}: attrs.experts must be a non-empty array")
    n, cols = o.shape(0, 2)
    o.agree(cols, width, f"router {o.ws[0]!r} columns vs input {o.ins[0]!r} width")
    o.agree(n, len(experts), f"router {o.ws[0]!r} rows vs the number of experts")
    for i, names in enumerate(experts):
        if not isinstance(names, list) or len(names) != 3 or not all(isinstance(x, str) for x in names):
            raise FormatError(f"{o.where}: attrs.experts[{i}] must be 3 tensor names (gate, up, down)")
        _glu_shapes(o, names, width, f"expert {i}")
    if len(o.ws) >= 4:
        _glu_shapes(o, o.ws[1:4], width, "shared expert")
    if len(o.ws) == 5:
        o.agree(o.shape(4, 2), (1, width), f"shared expert gate {o.ws[4]!r} shape vs [1, input width]")
    return width


WIDTH_RULES: dict[str, Callable[[_Op], int]] = {
    "embed": _embed, "rms_norm": _rms_norm, "linear": _linear, "rope": _same, "attention": _attention,
    "add": _pair, "swiglu": _pair, "last_token": _same, "geglu": _pair, "scale": _same, "softcap": _same,
    "moe": _moe,
}


def activation_widths(graph: Any, tensors: Mapping[str, Shaped]) -> dict[str, int]:
    """The width of every activation an op writes, in first-write order.

    Graph inputs (token ids, positions) are not float activations and are left out. A name
    written by several ops gets the largest of its widths; each op reads the latest one.

    Args:
        graph: the index's `graph` map (its `steps` and `inputs` are read).
        tensors: tensor name -> anything with a rows-first `shape`.
    Returns:
        name -> width (columns).
    Raises:
        FormatError naming the step and op, when an input has no known width, a weight is
        missing or misshapen, or widths disagree where the op needs them equal.
    Example:
        `activation_widths(archive.graph, archive.tensors)["logits"] == hparams["vocab"]`
    """
    steps = graph.get("steps") if isinstance(graph, dict) else None
    inputs = graph.get("inputs") if isinstance(graph, dict) else None
    if not isinstance(steps, list) or not isinstance(inputs, list):
        raise FormatError("graph: `steps` and `inputs` must be arrays")
    widths: dict[str, int] = {}
    cur: dict[str, int] = {}  # width of the latest write of each name
    graph_inputs = {x for x in inputs if isinstance(x, str)}
    for i, step in enumerate(steps):
        ops = step.get("ops") if isinstance(step, dict) else None
        if not isinstance(ops, list):
            raise FormatError(f"graph.steps[{i}]: `ops` must be an array")
        name = step.get("name")
        for j, raw in enumerate(ops):
            o = _Op(raw, f"graph.steps[{i}] {name!r} ops[{j}]", cur, graph_inputs, tensors)
            rule = WIDTH_RULES.get(o.kind)
            if rule is None:
                raise FormatError(f"{o.where}: unknown op; known: {', '.join(WIDTH_RULES)}")
            out = raw["out"]
            cur[out] = width = rule(o)
            widths[out] = max(widths.get(out, 0), width)
    return widths
