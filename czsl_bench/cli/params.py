"""Click parameter types shared by several commands."""

from __future__ import annotations

import math

import click


class FiniteFloat(click.ParamType):
    """A float that is a real number: ``nan`` and ``inf`` parse as floats but mean nothing as a
    threshold, and would only fail (or silently select nothing) after the work is done."""

    name = "float"

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number; write e.g. 0.4069", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; write e.g. 0.4069", param, ctx)
        return number


FINITE_FLOAT = FiniteFloat()
