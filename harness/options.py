"""Keyword options of registered functions (methods, executors): declared once, checked before compute.

A registered function declares its options as keyword-only arguments; their annotations say what
a value may be, so the same declaration serves the function, `mla-harness methods`, sweep YAML and
`--option key=value`:

    def care(layers, stats, budget, *,
             allocation: Literal["uniform", "waterfill"] = "waterfill",
             power: Annotated[float, Range(min=0)] = 0.5,
             damping: Annotated[float, Range(min=0)] = 0.01): ...

`option_problems(fn, opts)` lists every problem at once (unknown name, wrong type, out of range,
not one of the choices) as (name, message) pairs, so a sweep file reports them all with their
YAML lines and the CLI prints them on one line before any model is loaded. Numbers written as
YAML 1.1 reads them (`1e-3` is a string there) are accepted for float options and converted.
"""
from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from harness.errors import HarnessError

__all__ = ["Range", "Annotated", "Literal", "declared_options", "option_problems", "resolve_options",
           "parse_assignments"]


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric option: min <= v <= max; `open_min`/`open_max` make a bound strict."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    open_max: bool = False

    def problem(self, v: float) -> str | None:
        if self.min is not None and (v <= self.min if self.open_min else v < self.min):
            return f"{v!r} must be {'>' if self.open_min else '>='} {self.min:g}"
        if self.max is not None and (v >= self.max if self.open_max else v > self.max):
            return f"{v!r} must be {'<' if self.open_max else '<='} {self.max:g}"
        return None

    def __str__(self) -> str:
        lo = "" if self.min is None else f"{'>' if self.open_min else '>='} {self.min:g}"
        hi = "" if self.max is None else f"{'<' if self.open_max else '<='} {self.max:g}"
        return " and ".join(x for x in (lo, hi) if x)


@dataclass(frozen=True)
class OptionSpec:
    """One keyword option: default, allowed base types, optional choices / range, None allowed."""

    name: str
    default: Any
    types: tuple  # e.g. (float,), (int,), (str,), (bool,)
    choices: tuple | None = None
    range: Range | None = None
    nullable: bool = False

    def describe(self) -> str:
        if self.choices:
            kind = " | ".join(map(str, self.choices))
        else:
            kind = "/".join(t.__name__ for t in self.types) or "any"
            if self.range:
                kind += f" {self.range}"
        return kind + (" | null" if self.nullable else "")


def _spec(name: str, default: Any, hint: Any) -> OptionSpec:
    rng, choices, nullable = None, None, False
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        rng = next((e for e in extras if isinstance(e, Range)), None)
        hint = base
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else typing.Union[tuple(args)]
        origin = typing.get_origin(hint)
        if typing.get_origin(hint) is Annotated:
            base, *extras = typing.get_args(hint)
            rng = rng or next((e for e in extras if isinstance(e, Range)), None)
            hint, origin = base, typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(hint)
        kinds = tuple({type(c) for c in choices})
    elif hint in (int, float, str, bool):
        kinds = (hint,)
    elif hint is inspect.Parameter.empty or hint is Any:
        kinds = ()
    else:
        kinds = tuple(a for a in typing.get_args(hint) if isinstance(a, type)) or ()
    return OptionSpec(name, default, kinds, choices, rng, nullable or default is None)


def declared_options(fn: Callable) -> dict[str, OptionSpec]:
    """The keyword-only options of `fn` with what their annotations allow."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    return {k: _spec(k, p.default, hints.get(k, inspect.Parameter.empty))
            for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def _coerce(spec: OptionSpec, v: Any) -> tuple[Any, str | None]:
    """(value converted where that is safe, problem or None)."""
    if v is None:
        return v, None if spec.nullable else f"needs a value ({spec.describe()})"
    if spec.choices is not None:
        return v, None if v in spec.choices else (
            f"{v!r} is not one of {', '.join(map(repr, spec.choices))}")
    if not spec.types:
        return v, None
    if float in spec.types and isinstance(v, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            v = float(v)
        except ValueError:
            return v, f"expected a number, got {v!r}"
    if bool in spec.types:
        ok = isinstance(v, bool)
    elif isinstance(v, bool):
        ok = False
    elif float in spec.types:
        ok = isinstance(v, (int, float))
    else:
        ok = isinstance(v, spec.types)
    if not ok:
        want = "a number" if float in spec.types else "an integer" if int in spec.types else \
            " or ".join(t.__name__ for t in spec.types)
        return v, f"expected {want}, got {v!r}"
    if spec.range is not None and isinstance(v, (int, float)):
        return v, spec.range.problem(v)
    return v, None


def option_problems(fn: Callable, opts: dict, what: str = "") -> list[tuple[str, str]]:
    """Every problem of `opts` for `fn`'s declared options as (option name, message)."""
    known = declared_options(fn)
    out = []
    for k, v in opts.items():
        if k not in known:
            close = difflib.get_close_matches(str(k), list(known), n=1)
            out.append((k, f"{what + ' ' if what else ''}has no option {k!r}"
                           + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; its options are {', '.join(known) or '(none)'}"))
            continue
        _, problem = _coerce(known[k], v)
        if problem:
            out.append((k, problem))
    return out


def resolve_options(fn: Callable, opts: dict, what: str = "") -> dict:
    """Defaults filled in and values converted; raises one HarnessError listing every problem."""
    problems = option_problems(fn, opts, what)
    if problems:
        raise HarnessError("; ".join(f"{what + ' ' if what else ''}option {k}: {m}" if "has no option" not in m
                                     else m for k, m in problems))
    known = declared_options(fn)
    return {**{k: s.default for k, s in known.items()}, **{k: _coerce(known[k], v)[0] for k, v in opts.items()}}


def parse_assignments(items: list[str] | None, flag: str = "--option") -> dict:
    """`key=value` strings (value read as YAML: numbers, booleans, lists, strings) into a dict."""
    import yaml

    out = {}
    for it in items or []:
        if "=" not in it:
            raise HarnessError(f"{flag} {it!r} must look like key=value (e.g. {flag} allocation=uniform)")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise HarnessError(f"{flag} {it!r}: the value is not valid YAML") from None
    return out
