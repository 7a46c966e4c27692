"""Rule segments: named, overlapping customer groups declared in YAML over the point-in-time features.

A segment is a boolean expression over a customer's features (the columns of ``customer_features_v1``), written as
one would say it::

    segments:
      - name: frequent_visitor
        rule: sessions_per_week > 5
      - name: cart_abandoner          # the 24 h purchase window is in the feature's definition
        rule: cart_abandonments_28d > 0
      - name: content_explorer
        rule: browse_pages_per_session > 3
      - name: high_value
        rule: monetary_total > 500
      - name: new_visitor
        rule: tenure_days <= 30 and frequency == 0

A customer belongs to every segment whose rule holds (overlaps are allowed); the first of them in the file's order
is the *primary* segment, and a customer in none gets ``fallback``. A customer with no history at all (cold start)
gets ``cold_start_segment``.

The rule language is a small, safe subset of Python expressions, parsed once with :mod:`ast` and evaluated
column-wise over a frame: numbers, strings, ``True``/``False``/``None``, feature names, ``+ - * /``, comparisons
(chained too: ``1 <= n_categories < 3``), ``in``/``not in`` a literal list, ``and``/``or``/``not``. Nothing else
(no calls, attributes or subscripts). A comparison with a missing value is false, as in SQL.
"""

from __future__ import annotations

import ast
import difflib
import functools
import operator
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from personalize.errors import ConfigError, load_yaml_model

DEFAULT_PATH = Path(__file__).with_name("segments.yaml")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class RuleError(ConfigError):
    """A rule that is not in the rule language, or that names a column the data does not have."""


class Rule:
    """One parsed rule. ``Rule("monetary_total > 500").evaluate(frame)`` gives a boolean array, one per row."""

    def __init__(self, text: str) -> None:
        self.text = str(text).strip()
        if not self.text:
            raise RuleError("a rule is empty")
        try:
            tree = ast.parse(self.text, mode="eval")
        except SyntaxError as exc:
            raise RuleError(f"rule {self.text!r} does not parse: {exc.msg}") from None
        self._tree = tree.body
        self.names: frozenset[str] = frozenset(self._check(self._tree))

    def __repr__(self) -> str:
        return f"Rule({self.text!r})"

    def _check(self, node: ast.AST) -> set[str]:
        """The names the rule reads; anything outside the language is an error naming it."""
        if isinstance(node, ast.Name):
            return {node.id}
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, str, bool, type(None))):
                raise RuleError(f"rule {self.text!r}: constant {node.value!r} is not a number, string or boolean")
            return set()
        if isinstance(node, ast.BoolOp):
            return set().union(*(self._check(v) for v in node.values))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            return self._check(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return self._check(node.left) | self._check(node.right)
        if isinstance(node, ast.Compare):
            names = self._check(node.left)
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)):
                    if not isinstance(right, (ast.List, ast.Tuple, ast.Set)) or not all(
                            isinstance(e, ast.Constant) for e in right.elts):
                        raise RuleError(f"rule {self.text!r}: `in` takes a literal list, like x in ['a', 'b']")
                elif type(op) in _COMPARE:
                    names |= self._check(right)
                else:
                    raise RuleError(f"rule {self.text!r}: operator {type(op).__name__} is not allowed")
            return names
        what = type(node).__name__
        raise RuleError(f"rule {self.text!r}: {what} is not allowed (numbers, names, arithmetic, comparisons, "
                        "in [...], and/or/not only)")

    def evaluate(self, frame: pd.DataFrame) -> np.ndarray:
        missing = sorted(self.names - set(frame.columns))
        if missing:
            raise RuleError(f"rule {self.text!r} reads {', '.join(missing)}, which the data does not have")
        value = self._eval(self._tree, frame)
        if not isinstance(value, pd.Series):  # a constant rule
            return np.full(len(frame), bool(value))
        return value.fillna(False).astype(bool).to_numpy()

    def _eval(self, node: ast.AST, frame: pd.DataFrame) -> Any:
        if isinstance(node, ast.Name):
            column = frame[node.id]
            return column if column.dtype != object else _numeric_if_possible(column)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BoolOp):
            parts = [_truth(self._eval(v, frame), len(frame)) for v in node.values]
            out = parts[0]
            for part in parts[1:]:
                out = (out & part) if isinstance(node.op, ast.And) else (out | part)
            return out
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, frame)
            return ~_truth(value, len(frame)) if isinstance(node.op, ast.Not) else -value
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, frame), self._eval(node.right, frame)
            if isinstance(node.op, ast.Div) and not isinstance(right, pd.Series) and right == 0:
                return pd.Series(np.nan, index=frame.index)
            value = _ARITH[type(node.op)](left, right)
            # x / 0 is missing, as in the one-record path
            return value.replace([np.inf, -np.inf], np.nan) if isinstance(value, pd.Series) else value
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, frame)
            out = None
            for op, right_node in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)):
                    members = [e.value for e in right_node.elts]
                    series = left if isinstance(left, pd.Series) else pd.Series([left] * len(frame))
                    inside = series.isin(members)
                    part = (~inside if isinstance(op, ast.NotIn) else inside) & series.notna()
                    right = left
                else:
                    right = self._eval(right_node, frame)
                    part = _compare(_COMPARE[type(op)], left, right, len(frame))
                out = part if out is None else (out & part)
                left = right
            return out
        raise RuleError(f"rule {self.text!r}: cannot evaluate {type(node).__name__}")  # unreachable after _check


    def holds(self, record: dict[str, Any]) -> bool:
        """The rule on one record (a dict), in plain Python: the request path's fast way. A name the record lacks
        counts as missing."""
        value = self._eval_one(self._tree, record)
        return bool(value) if value is not None else False

    def _eval_one(self, node: ast.AST, record: dict[str, Any]) -> Any:
        if isinstance(node, ast.Name):
            value = record.get(node.id)
            return None if isinstance(value, float) and value != value else value
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BoolOp):
            values = (bool(self._eval_one(v, record)) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.UnaryOp):
            value = self._eval_one(node.operand, record)
            if isinstance(node.op, ast.Not):
                return not bool(value)
            return None if value is None else -value
        if isinstance(node, ast.BinOp):
            left, right = self._eval_one(node.left, record), self._eval_one(node.right, record)
            if left is None or right is None:
                return None
            try:
                return _ARITH[type(node.op)](left, right)
            except (ZeroDivisionError, TypeError):
                return None
        if isinstance(node, ast.Compare):
            left = self._eval_one(node.left, record)
            for op, right_node in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)):
                    if left is None:
                        return False
                    inside = left in [e.value for e in right_node.elts]
                    if inside == isinstance(op, ast.NotIn):
                        return False
                    continue
                right = self._eval_one(right_node, record)
                if left is None or right is None:
                    return False
                try:
                    if not _COMPARE[type(op)](left, right):
                        return False
                except TypeError:
                    return False
                left = right
            return True
        raise RuleError(f"rule {self.text!r}: cannot evaluate {type(node).__name__}")


@functools.lru_cache(maxsize=1024)
def compiled(text: str) -> Rule:
    """The parsed rule for ``text``, parsed once per process."""
    return Rule(text)


def _numeric_if_possible(column: pd.Series) -> pd.Series:
    converted = pd.to_numeric(column, errors="coerce")
    return converted if converted.notna().sum() == column.notna().sum() else column


def _truth(value: Any, n: int) -> pd.Series:
    if isinstance(value, pd.Series):
        return value.fillna(False).astype(bool)
    return pd.Series(np.full(n, bool(value)))


def _compare(op: Any, left: Any, right: Any, n: int) -> pd.Series:
    """``op(left, right)`` element-wise, false where either side is missing (SQL's three-valued logic, collapsed)."""
    ls = left if isinstance(left, pd.Series) else pd.Series([left] * n)
    rs = right if isinstance(right, pd.Series) else pd.Series([right] * n)
    valid = (ls.notna() & rs.notna()).to_numpy()
    out = np.zeros(n, dtype=bool)
    if valid.any():
        try:
            result = op(ls[valid].reset_index(drop=True), rs[valid].reset_index(drop=True))
        except TypeError as exc:
            raise RuleError(f"cannot compare these values: {exc}") from None
        out[valid] = np.asarray(result, dtype=bool)
    return pd.Series(out)


# --- configuration -----------------------------------------------------------------------------------------------
class SegmentDef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    rule: str
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"{value!r}: a segment name is lower-case letters, digits and _, starting with a letter")
        return value

    @field_validator("rule")
    @classmethod
    def _rule(cls, value: str) -> str:
        try:
            Rule(value)
        except RuleError as exc:
            raise ValueError(str(exc)) from None
        return value


class SegmentConfig(BaseModel):
    """The segment catalog: rule segments in priority order, the fallback and the cold-start segment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    segments: list[SegmentDef] = Field(min_length=1)
    fallback: str = "other"
    cold_start_segment: str = "new_visitor"

    @model_validator(mode="after")
    def _unique(self) -> SegmentConfig:
        names = [s.name for s in self.segments]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"segment {dup[0]!r} is declared twice")
        if self.fallback in names:
            raise ValueError(f"fallback {self.fallback!r} is also a rule segment's name")
        return self

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    def rules(self) -> dict[str, Rule]:
        return {s.name: compiled(s.rule) for s in self.segments}

    def columns(self) -> set[str]:
        """Every feature the rules read."""
        return set().union(*(r.names for r in self.rules().values()))


def load_segments(path: Path | str | None = None) -> SegmentConfig:
    """The segment catalog from YAML (the embedded default when ``path`` is None); errors name the field."""
    path = Path(path) if path is not None else DEFAULT_PATH
    return load_yaml_model(path, SegmentConfig, f"no segment file at {path}")


# --- assignment ---------------------------------------------------------------------------------------------------
def assign(frame: pd.DataFrame, config: SegmentConfig) -> pd.DataFrame:
    """One row per input row: a boolean column per segment, ``segments`` (the matching names, in priority order)
    and ``segment`` (the primary one, or the fallback). Pure: the frame in, a frame out, aligned on its index."""
    frame = frame.reset_index(drop=True)
    member = pd.DataFrame({name: rule.evaluate(frame) for name, rule in config.rules().items()})
    names = np.array(config.names, dtype=object)
    matrix = member.to_numpy(dtype=bool)
    lists = [list(names[row]) for row in matrix]
    primary = [m[0] if m else config.fallback for m in lists]
    return member.assign(segments=lists, segment=primary)


def assign_one(record: dict[str, Any] | None, config: SegmentConfig) -> dict[str, Any]:
    """The segments of one feature record; ``None`` (no history) gives the cold-start segment."""
    if record is None:
        return {"segments": [config.cold_start_segment], "segment": config.cold_start_segment, "cold_start": True}
    names = [s.name for s in config.segments if compiled(s.rule).holds(record)]
    return {"segments": names, "segment": names[0] if names else config.fallback, "cold_start": False}


def counts(assigned: pd.DataFrame, config: SegmentConfig) -> dict[str, Any]:
    """Members per segment (overlapping), customers per primary segment (a partition: they sum to the rows)."""
    return {"rows": len(assigned), "members": {n: int(assigned[n].sum()) for n in config.names},
            "primary": {str(k): int(v) for k, v in assigned["segment"].value_counts().items()}}


def check_columns(config: SegmentConfig, available: Iterable[str]) -> None:
    available = set(available)
    missing = sorted(config.columns() - available)
    if missing:
        hints = [f"{name}: did you mean {close}?" for name in missing
                 if (close := closest_name(name, available))]
        raise RuleError(f"the segment rules read {', '.join(missing)}, which the feature set does not have"
                        + (f" ({'; '.join(hints)})" if hints else ""))


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """The known name ``name`` was most likely meant as: the same once made a column name (``cat_share_Küche`` is
    ``cat_share_kuche``), else the closest spelling, else None."""
    from features.definitions import slug

    known = sorted(known)
    if slug(name) in known:
        return slug(name)
    close = difflib.get_close_matches(name, known, n=1)
    return close[0] if close else None
