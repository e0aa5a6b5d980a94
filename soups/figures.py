"""Matplotlib on a machine without a display: every figure of the platform is drawn through `canvas`."""

from __future__ import annotations

from typing import Any


def canvas(width: float, height: float) -> tuple[Any, Any]:
    """A new (figure, axes) on the Agg backend, imported here so that importing a recipe or the report
    never loads matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))
