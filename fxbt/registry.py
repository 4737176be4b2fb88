"""The rule registry: the built-in pattern library plus the user's own rules."""
from __future__ import annotations

import importlib

from .errors import PatternError
from .pattern import Rule

BUILTIN_FAMILIES = ("attention", "encoder")
_user_rules: dict[str, Rule] = {}


def builtin_rules() -> list[Rule]:
    rules = []
    for family in BUILTIN_FAMILIES:
        rules.extend(importlib.import_module(f"fxbt.patterns.{family}").RULES)
    return rules


def all_rules() -> dict[str, Rule]:
    found = {r.name: r for r in builtin_rules()}
    found.update(_user_rules)
    return found


def select(patterns) -> list[Rule]:
    """``patterns``: None (every registered rule), or names and `Rule` objects to use instead."""
    available = all_rules()
    if patterns is None:
        return list(available.values())
    chosen = []
    for p in patterns:
        if isinstance(p, Rule):
            chosen.append(p)
        elif isinstance(p, str) and p in available:
            chosen.append(available[p])
        else:
            raise PatternError(f"unknown pattern {p!r}; registered: {', '.join(sorted(available))}")
    return chosen
