"""A report directory: results.json, the scenario as TOML, PNG figures and index.html.

`write` is all `dqmig report` does with a saved results.json: nothing is rerun, so figures
and tables can be redrawn (after a change to them) from results measured earlier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dqmig.experiments import figures, grid, html, phase, results, scenario, sweep, tables

FILES = ("results.json", "scenario.toml", "index.html")


def tables_for(doc: dict[str, Any]) -> list[tables.Table]:
    if grid.is_grid(doc):
        sweep_table = tables.sweep_table(sweep.summarize(doc), "cell")
        return [tables.phase_table(grid.phases(doc), doc["sweep"]["grid"]), sweep_table]
    if doc["kind"] == "sweep":
        return [tables.sweep_table(sweep.summarize(doc), doc["sweep"]["name"])]
    return [tables.compare_table(doc["runs"]), tables.vcpu_table(doc["runs"])]


def text(doc: dict[str, Any]) -> str:
    """The tables as the terminal shows them."""
    return "\n\n".join(t.text() for t in tables_for(doc))


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    """Writes the report for `doc` into `out` (created if needed); returns the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results.save(doc, out / "results.json")
    toml = scenario.dump_toml(doc["scenario"])
    (out / "scenario.toml").write_text(toml)
    drawn = (phase.draw if grid.is_grid(doc) else figures.draw)(doc, out)
    (out / "index.html").write_text(html.page(doc, tables_for(doc), drawn, out, toml))
    return [out / f for f in FILES] + [out / name for _, name in drawn]
