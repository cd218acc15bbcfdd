"""The report page: one self-contained HTML file (figures inlined as base64 PNG, no scripts,
no external files), so it can be mailed or attached to a bug as it is."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from dqmig.experiments.figures import SUMMARY_PNG
from dqmig.experiments.phase import PHASE_PNG
from dqmig.experiments.tables import Table
from dqmig.units import format_size

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { color: #666; } dd { margin: 0; }
.note { color: #666; font-size: 0.9em; }
.best { font-weight: bold; background: #e2f1de; }
"""

LEGEND = (
    "slowdown = 1 - (a vCPU's pace during migration / its pace before), averaged per class; "
    "net = the same with pace counted per second the vCPU was not descheduled (running, in a throttle "
    "sleep or halted; the rest is its steal: the migration thread, the destination and other jobs took "
    "the core), which shows what the policy took rather than what the shared host did; "
    "fairness = Jain's index over the vCPUs' retained pace (1 = all kept the same share); "
    "peak throttle = the largest share of any 1 s of the migration that one vCPU spent in throttle sleeps. "
    "Total time and downtime are QEMU's query-migrate fields: downtime runs from the stop to the last "
    "byte sent (dqmig's digest check and the resume come after it, in x-blackout-time). "
    "load 1m = the host's 1-minute load average at the run's start → end (at the end in sweeps); "
    "host steal % = the share of the host's CPU time its hypervisor gave to others during the run "
    "(/proc/stat): other load and steal slow the guest too, so read the slowdowns beside them. "
)
LEAD = (SUMMARY_PNG, PHASE_PNG)  # the figure that answers the page's question, shown first
SWEEP_LEGEND = (
    "Each cell: median [min..max] over the repetitions; converged k/n; a run that did not converge "
    "counts with the time it was given (x-max-time)."
)


def page(doc: dict[str, Any], tables: list[Table], figures: list[tuple[str, str]], out: Path, toml: str) -> str:
    """The page for results `doc`; `figures` are (title, PNG file name in `out`). The summary
    figure comes first, before the tables: it answers the page's question at a glance."""
    lead = [f for f in figures if f[1] in LEAD]
    rest = [f for f in figures if f[1] not in LEAD]
    scenario = doc["scenario"]
    title = f"dqmig {doc['kind']}: {scenario.get('name', 'scenario')}"
    if doc["kind"] == "sweep":
        title += f", {doc['sweep']['name']} sweep" + (f" ({doc['sweep']['axis']})" if "grid" in doc["sweep"] else "")
    parts = [
        f"<h1>{_e(title)}</h1>",
        f"<p>{_e(scenario.get('description', ''))}</p>",
        _facts(doc),
        *(_figure(t, out / name, "h2") for t, name in lead),
        "<h2>Results</h2>",
        *(t.html() for t in tables),
        f'<p class="note">{_e(LEGEND)}{_e(SWEEP_LEGEND if doc["kind"] == "sweep" else "")}</p>',
        "<h2>Figures</h2>",
        *(_figure(t, out / name) for t, name in rest),
        _notes(doc),
        "<h2>Scenario</h2>",
        '<p class="note">Saved as scenario.toml beside this page, --set overrides included: to rerun, give '
        "it to the command above as its scenario.</p>",
        f"<pre>{_e(toml)}</pre>",
    ]
    body = "\n".join(p for p in parts if p)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _e(text: Any) -> str:
    return html.escape(str(text))


def _facts(doc: dict[str, Any]) -> str:
    m, git = doc["machine"], doc.get("git")
    commit = "unknown (not built from a git checkout)"
    if git:
        how = {"checkout": "from the checkout", "build": "recorded at build"}.get(git.get("source", ""), "")
        commit = f"{git['commit'][:12]} {how}{', with local changes' if git.get('dirty') else ''}".strip()
    load = m.get("load-average")
    facts = {
        "command": " ".join(doc["command"]),
        "created": doc["created"],
        "dqmig": f"{doc['dqmig']}, commit {commit}",
        "machine": f"{m['cpus']} CPUs, {format_size(m['memory'])}, {m['platform']}",
        "python": f"{m['python']}, numpy {m.get('numpy')}, matplotlib {m.get('matplotlib')}",
        "load average at start": ", ".join(f"{x:.2f}" for x in load) if load else "-",
    }
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts.items())
    return f"<dl>{items}</dl>"


def _figure(title: str, path: Path, heading: str = "h3") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<{heading}>{_e(title)}</{heading}>\n<img alt="{_e(title)}" src="data:image/png;base64,{data}">'


def _notes(doc: dict[str, Any]) -> str:
    """Why runs ended the way they did, and policy switches (fallbacks)."""
    items = []
    for r in doc["runs"]:
        where = r["policy"] + (f" at {doc['sweep']['labels'][r['point']]}" if "point" in r else "")
        if r.get("error"):
            items.append(f"<li>{_e(where)}: {_e(r['status'])}: {_e(r['error'])}</li>")
        if r.get("retried"):
            items.append(
                f"<li>{_e(where)}, repetition {r.get('repeat', 0) + 1}: retried {r['retried']} time(s) "
                f"(a worker was lost); it ran on {_e((r.get('machine') or {}).get('hostname', '?'))}</li>"
            )
        for c in r.get("policy-changes", [])[1:]:
            items.append(f"<li>{_e(where)}: at {c['t']:.1f} s switched to {_e(c['policy'])}: {_e(c['reason'])}</li>")
    for f in doc.get("failed", []):
        where = f"{f['policy']} at {doc['sweep']['labels'][f['point']]}, repetition {f['repeat'] + 1}"
        items.append(f"<li>{_e(where)}: failed, not in the results (--resume runs it again): {_e(f['error'])}</li>")
    items = list(dict.fromkeys(items))  # a sweep repeats the same reason many times
    return f"<h2>Notes</h2><ul>{''.join(items)}</ul>" if items else ""
