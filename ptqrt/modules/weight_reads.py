"""Linears whose weight a containing module reads itself, found in the modules' source.

A module that computes with ``self.dt_proj.weight`` (Mamba's mixer), or casts its input to
``self.lm_head.weight.dtype``, would get int8 weights once the linear is a QuantLinear: quantize()
keeps such linears float and names them. The rule reads the source (``ast``) of each containing
module's class and bases; see weight_read_directly for what counts.
"""
from __future__ import annotations

import ast
import inspect
import operator
import textwrap
from typing import Optional

from torch import nn

_SKIP_METHODS = ("init", "tie", "reset")  # constructors, weight initialisation and tying: not run on a quantized model
_UNKNOWN = object()
_reads: dict = {}


def _self_path(node: ast.AST) -> Optional[str]:
    """"a.b" for the expression self.a.b, None for any other."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join(reversed(parts)) if isinstance(node, ast.Name) and node.id == "self" and parts else None


def _weight_reads(klass: type) -> list[tuple[str, tuple]]:
    """(p, guards) for each ``self.p.weight`` a method defined in `klass` itself reads (its constructor,
    weight initialisation and tying aside), from its source where there is one; guards: the
    ``(if-test, taken when true)`` of each branch the read sits in. A method that names int8 or
    is_floating_point is written for integer weights (T5's guard) and is left out, and so are reads
    of the weight's device or shape only."""
    if klass not in _reads:
        found = []
        for fname, fn in vars(klass).items():
            if not inspect.isfunction(fn) or any(w in fname.lower() for w in _SKIP_METHODS):
                continue
            try:
                src = textwrap.dedent(inspect.getsource(fn))
                tree = ast.parse(src)
            except (OSError, TypeError, SyntaxError):  # no source (built at run time, or a C extension)
                continue
            if "int8" in src or "is_floating_point" in src:  # written for integer weights (T5's guard)
                continue

            def visit(node: ast.AST, guards: tuple) -> None:
                if isinstance(node, ast.If):
                    visit(node.test, guards)
                    for n in node.body:
                        visit(n, guards + ((node.test, True),))
                    for n in node.orelse:
                        visit(n, guards + ((node.test, False),))
                    return
                if isinstance(node, ast.Attribute) and node.attr in ("device", "shape") and isinstance(
                        node.value, ast.Attribute) and node.value.attr == "weight":
                    return  # where, or how large, the weight is: a QuantLinear's int8 weight answers alike
                if isinstance(node, ast.Attribute) and node.attr == "weight" and _self_path(node.value):
                    found.append((_self_path(node.value), guards))
                for child in ast.iter_child_nodes(node):
                    visit(child, guards)
            visit(tree, ())
        _reads[klass] = found
    return _reads[klass]


def _value(node: ast.AST, owner: nn.Module):
    """The value of an if-test made of constants and plain attributes of self (``self.pretraining_tp > 1
    and self.slow_but_exact``) on module `owner`, self.training False (a quantized model runs for
    inference); _UNKNOWN for anything else."""
    try:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Attribute) and _self_path(node) == "training":
            return False  # a quantized model runs for inference
        if isinstance(node, ast.Attribute) and _self_path(node):
            v = owner
            for part in _self_path(node).split("."):
                v = getattr(v, part)
            return v if isinstance(v, (bool, int, float, str, type(None))) else _UNKNOWN
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            v = _value(node.operand, owner)
            return _UNKNOWN if v is _UNKNOWN else not v
        if isinstance(node, ast.BoolOp):
            vals = [_value(v, owner) for v in node.values]
            decided = [bool(v) for v in vals if v is not _UNKNOWN]
            if isinstance(node.op, ast.And):
                return False if False in decided else (True if len(decided) == len(vals) else _UNKNOWN)
            return True if True in decided else (False if len(decided) == len(vals) else _UNKNOWN)
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            a, b = _value(node.left, owner), _value(node.comparators[0], owner)
            ops = {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
                   ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Is: operator.is_, ast.IsNot: operator.is_not}
            if a is not _UNKNOWN and b is not _UNKNOWN and type(node.ops[0]) in ops:
                return ops[type(node.ops[0])](a, b)
    except Exception:  # noqa: BLE001 - an attribute that is not there, a comparison that fails: unknown
        pass
    return _UNKNOWN


def weight_read_directly(model: nn.Module, names) -> set:
    """Those of the linears `names` (of `model`) whose weight a module containing them reads itself
    (``self.dt_proj.weight @ x`` in Mamba's mixer, ``x.to(self.lm_head.weight.dtype)``): swapped for a
    QuantLinear, the reader would get int8 weights. Found in the source of the containing modules'
    classes and their bases; a read in a branch that the module's own settings rule out (Bloom's
    ``if self.pretraining_tp > 1 and self.slow_but_exact``) does not count, and a read through another
    name is not seen."""
    def may_run(guards: tuple, owner: nn.Module) -> bool:
        for test, taken in guards:
            v = _value(test, owner)
            if v is not _UNKNOWN and bool(v) != taken:
                return False
        return True

    mods = dict(model.named_modules(remove_duplicate=False))  # every name of a shared module
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            rel, owner = ".".join(parts[i:]), mods[".".join(parts[:i])]
            if any(path == rel and may_run(guards, owner) for k in type(owner).__mro__ if k not in (nn.Module, object)
                   for path, guards in _weight_reads(k)):
                out.add(name)
                break
    return out
