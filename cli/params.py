"""Parameter types shared by the commands."""

from __future__ import annotations

import math

import click

__all__ = ["FiniteFloatRange"]


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and +-inf (every comparison with nan is false, so a plain
    FloatRange lets `--lam nan` through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class CommaList(click.ParamType):
    """A comma-separated list, each item converted by `item` (a click type): "0.1,0.5" -> [0.1, 0.5]."""

    name = "list"

    def __init__(self, item: click.ParamType) -> None:
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        return [self.item.convert(p, param, ctx) for p in parts]
