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
