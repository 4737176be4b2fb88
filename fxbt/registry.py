"""The rule registry: the built-in pattern library plus the user's own rules."""
from __future__ import annotations

import importlib
import threading
from typing import Callable

from .errors import PatternError
from .pattern import Rule

BUILTIN_FAMILIES = ("attention", "encoder", "padding_free")
DEFAULTS = "defaults"  # in optimize(patterns=[...]): every built-in and registered rule
_user_rules: dict[str, Rule] = {}
_LOCK = threading.Lock()  # registering from several threads at once


def builtin_rules() -> list[Rule]:
    rules = []
    for family in BUILTIN_FAMILIES:
        rules.extend(importlib.import_module(f"fxbt.patterns.{family}").RULES)
    return rules


def all_rules() -> dict[str, Rule]:
    found = {r.name: r for r in builtin_rules()}
    with _LOCK:
        found.update(_user_rules)
    return found


def register_pattern(name: str, pattern: Callable | None = None, replacement: Callable | None = None, *,
                     check: Callable | None = None, kernel: str | None = None, replace: bool = False):
    """Register a rule that every later `fxbt.optimize` call applies.

    ``register_pattern(name, pattern, replacement, check=...)`` registers and returns the `Rule`;
    ``@register_pattern(name, replacement=...)`` on the pattern function does the same as a decorator.
    The pattern is an example function written like the code it matches, the replacement takes the same
    arguments; ``check(match)`` may return `fxbt.Decline(reason)` to leave a match alone.
    """
    if replacement is None:
        raise PatternError(f"register_pattern({name!r}): give the replacement function (replacement=...)")
    if pattern is None:
        return lambda fn: (register_pattern(name, fn, replacement, check=check, kernel=kernel, replace=replace), fn)[1]
    if not isinstance(name, str) or not name.isidentifier():
        raise PatternError(f"pattern name {name!r} must be an identifier, e.g. 'rms_norm'")
    builtin = {r.name for r in builtin_rules()}
    if name in builtin:
        raise PatternError(f"{name!r} is a built-in rule; choose another name")
    rule = Rule(name, pattern, replacement, check, kernel=kernel)
    with _LOCK:
        if name in _user_rules and not replace:
            raise PatternError(f"a pattern named {name!r} is already registered (at {_user_rules[name].defined_at}); "
                               "choose another name, or pass replace=True")
        _user_rules[name] = rule
    return rule


def unregister_pattern(name: str) -> None:
    with _LOCK:
        if name not in _user_rules:
            raise PatternError(f"no registered pattern named {name!r}")
        del _user_rules[name]


def select(patterns) -> list[Rule]:
    """``patterns``: None (every rule), or names, `Rule` objects and "defaults" (every rule) to use."""
    available = all_rules()
    if patterns is None:
        return list(available.values())
    chosen: dict[str, Rule] = {}
    for p in ([patterns] if isinstance(patterns, (str, Rule)) else patterns):
        if isinstance(p, Rule):
            chosen[p.name] = p
        elif p == DEFAULTS:
            chosen.update(available)
        elif isinstance(p, str) and p in available:
            chosen[p] = available[p]
        else:
            raise PatternError(f"unknown pattern {p!r}; registered: {', '.join(sorted(available))}")
    return list(chosen.values())
