"""A grid sweep's figures: phase diagrams of where each policy wins, and a heat map per policy.

The first grid axis runs along x, the second along y; a third gives one row of panels per
value. Phase diagram: each cell coloured by the policy that converged fastest (left) and by
the one that kept the read-mostly vCPUs' pace best (right), among the policies that mostly
converged there (`grid.converged`); cells where nothing converged are hatched. Heat maps:
per policy, the median total time and readers' slowdown of every cell, on colour scales
shared by all policies so the maps compare; cells where the policy did not converge are
hatched and their time is the time it was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from dqmig.experiments import figures, grid, sweep

PHASE_PNG = "phase.png"
HATCH = {"hatch": "xx", "fill": False, "edgecolor": "0.55", "lw": 0}
PANEL = (4.6, 3.4)  # inches per panel


def draw(doc: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Writes the phase diagram and every policy's heat map into `out`."""
    made = [("Phase diagram: where each policy wins", PHASE_PNG, phase_figure)]
    for policy in doc["policies"]:
        made.append((f"{policy}: total time and readers' slowdown per cell", f"grid-{policy}.png", _heat(policy)))
    return figures.render(doc, made, out)


def _heat(policy: str) -> Any:
    return lambda doc: heat_figure(doc, policy)


# -- layout --------------------------------------------------------------------------------------


def _layout(doc: dict[str, Any], cols: int) -> tuple[Figure, np.ndarray, list[dict[str, Any]]]:
    axes = doc["sweep"]["grid"]
    rows = len(axes[2]["labels"]) if len(axes) == 3 else 1
    fig, panels = plt.subplots(
        rows, cols, figsize=(PANEL[0] * cols + 1.5, PANEL[1] * rows), layout="constrained", squeeze=False
    )
    return fig, panels, axes


def _frame(ax: Axes, axes: list[dict[str, Any]], row: int) -> None:
    x, y = axes[0], axes[1]
    ax.set_xticks(range(len(x["labels"])), x["labels"])
    ax.set_yticks(range(len(y["labels"])), y["labels"])
    ax.set_xlabel(x["name"])
    ax.set_ylabel(y["name"] + (f"\n({axes[2]['name']}={axes[2]['labels'][row]})" if len(axes) == 3 else ""))
    ax.set_xlim(-0.5, len(x["labels"]) - 0.5)
    ax.set_ylim(-0.5, len(y["labels"]) - 0.5)


def _where(cell: list[int]) -> tuple[int, int, int]:
    """(panel row, y, x) of a cell."""
    return (cell[2] if len(cell) == 3 else 0, cell[1], cell[0])


def _grid_of(doc: dict[str, Any], rows: int, value: Any) -> np.ndarray:
    """value(point) for every cell, as [panel row, y, x] (NaN where it has none)."""
    axes = doc["sweep"]["grid"]
    m = np.full((rows, len(axes[1]["labels"]), len(axes[0]["labels"])), np.nan)
    for i, cell in enumerate(doc["sweep"]["cells"]):
        v = value(i)
        if v is not None:
            m[_where(cell)] = v
    return m


def _hatch(ax: Axes, x: int, y: int, pattern: str = HATCH["hatch"]) -> None:
    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, **(HATCH | {"hatch": pattern})))


# -- phase diagram -------------------------------------------------------------------------------


def phase_figure(doc: dict[str, Any]) -> Figure:
    fig, panels, axes = _layout(doc, 2)
    policies = doc["policies"]
    colors = [figures.POLICY_COLORS.get(p, f"C{k}") for k, p in enumerate(policies)]
    cmap = ListedColormap(colors).with_extremes(bad="white")
    phases = grid.phases(doc)
    for col, (key, value, fmt, title) in enumerate(
        (
            ("fastest", "total-time", lambda v: f"{v / 1000:.1f} s", "fastest to converge"),
            ("gentlest", "slowdown-reader", lambda v: f"{v * 100:.0f} %", "kept the readers' pace best"),
        )
    ):
        winner = _grid_of(doc, panels.shape[0], lambda i, k=key: _index(policies, phases[i][k]))
        for row in range(panels.shape[0]):
            ax = panels[row, col]
            ax.imshow(winner[row], cmap=cmap, vmin=-0.5, vmax=len(policies) - 0.5, origin="lower", aspect="auto")
            _frame(ax, axes, row)
            ax.set_title(title)
        for p in phases:
            row, y, x = _where(p["cell"])
            ax = panels[row, col]
            if not p["ran"]:
                _hatch(ax, x, y, "//")
                ax.text(x, y, "not run\n(failed)", ha="center", va="center", fontsize=8, color="0.3")
            elif not p["converged"]:
                _hatch(ax, x, y)
                ax.text(x, y, "nothing\nconverged", ha="center", va="center", fontsize=8, color="0.3")
            elif p[key] is None:
                ax.text(x, y, "no read-mostly\nvCPU", ha="center", va="center", fontsize=8, color="0.3")
            else:
                ax.text(x, y, f"{p[key]}\n{fmt(p[value])}", ha="center", va="center", fontsize=8, color="white")
    handles = {p: Patch(color=cmap(k)) for k, p in enumerate(policies)}
    handles["nothing converged"] = Patch(**(HATCH | {"edgecolor": "0.4"}))
    if not all(p["ran"] for p in phases):
        handles["not run (every run failed)"] = Patch(**(HATCH | {"edgecolor": "0.4", "hatch": "//"}))
    figures._legend(fig, handles)
    fig.suptitle(_note(doc), x=0.01, ha="left", fontsize=9)
    return fig


def _index(policies: list[str], policy: str | None) -> float | None:
    return None if policy is None else float(policies.index(policy))


def _note(doc: dict[str, Any]) -> str:
    n = doc["sweep"]["repeat"]
    return f"median over {n} run(s) per cell and policy; a policy counts where most of its runs converged"


# -- heat maps -----------------------------------------------------------------------------------


def heat_figure(doc: dict[str, Any], policy: str) -> Figure | None:
    points = sweep.summarize(doc)
    mine = {p["point"]: p for p in points if p["policy"] == policy}
    if not any(p["runs"] for p in mine.values()):
        return None
    fig, panels, axes = _layout(doc, 2)
    maps = (
        ("total-time", "total time (s)", 1 / 1000, "viridis"),
        ("slowdown-reader", "readers' slowdown (%)", 100, "magma_r"),
    )
    for col, (key, label, scale, cmap) in enumerate(maps):
        shared = [p[key]["median"] * scale for p in points if p[key]["median"] is not None]  # every policy's
        norm = Normalize(min(shared, default=0), max(shared, default=1))
        m = _grid_of(doc, panels.shape[0], lambda i, k=key, s=scale: _median(mine.get(i), k, s))
        for row in range(panels.shape[0]):
            ax = panels[row, col]
            image = ax.imshow(m[row], cmap=cmap, norm=norm, origin="lower", aspect="auto")
            _frame(ax, axes, row)
            ax.set_title(label)
            if row == 0:
                fig.colorbar(image, ax=panels[:, col], label=label, shrink=0.9)
        for i, cell in enumerate(doc["sweep"]["cells"]):
            p = mine.get(i)
            row, y, x = _where(cell)
            if p is None or not p["runs"]:
                continue
            if not grid.converged(p):
                _hatch(panels[row, col], x, y)
            v = m[row, y, x]
            text = "-" if np.isnan(v) else f"{v:.1f}" if key == "total-time" else f"{v:.0f}"
            shade = image.cmap(norm(v)) if not np.isnan(v) else (1, 1, 1, 1)
            panels[row, col].text(x, y, text, ha="center", va="center", fontsize=8, color=_ink(shade))
    handles = {"did not converge (time given)": Patch(**(HATCH | {"edgecolor": "0.4"}))}
    figures._legend(fig, handles, loc="outside lower center")
    fig.suptitle(f"{policy}: {_note(doc)}\ncolour scales shared by all policies", x=0.01, ha="left", fontsize=9)
    return fig


def _median(point: dict[str, Any] | None, key: str, scale: float) -> float | None:
    if point is None or point[key]["median"] is None:
        return None
    return point[key]["median"] * scale


def _ink(rgba: tuple[float, ...]) -> str:
    """Black on light cells, white on dark ones."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
