"""The report's figures (matplotlib, Agg, PNG), drawn from a results document alone.

Compare: first a one-glance summary (per policy: total time, downtime and the share of its
pace each vCPU class kept, on one shared policy axis), then guest progress per vCPU (and
ms/GiB for stress programs), remaining bytes and dirty rate vs bandwidth, and throttling:
one row per policy, every row on the same time axis (and the same y axis where the unit is
the same), the migration's start, its dirty syncs (iterations) and the switchover drawn in,
and one legend outside the data. Sweep: total time and guest slowdown against the swept
value, one line per policy, with "did not converge" drawn hollow at the cap. Sizes in MiB,
rates in MiB/s; 150 dpi with 10-11 pt text.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib's own dependency)

from dqmig.experiments import sweep as sweeps  # noqa: E402
from dqmig.units import MiB  # noqa: E402

DPI = 150
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 11,
}
PALETTE = 64  # colours per PNG
WIDTH = 10.0  # inches
ROW = 2.2  # inches per policy row
SMOOTH = 5  # samples (100 ms each) in the rolling mean of guest pace
LEGEND_VCPUS = 8  # more vCPUs than this are labelled per class, not one by one
CLASS_MAPS = {"writer": "Reds", "reader": "Blues", "idle": "Greys", "device": "Purples"}
CLASS_ORDER = ("writer", "reader", "device")  # the summary's pace bars; idle vCPUs have no pace
POLICY_COLORS = {"none": "tab:gray", "auto-converge": "tab:red", "dirty-limit": "tab:orange", "dirty-quota": "tab:blue"}
SUMMARY_PNG = "summary.png"
BEFORE = {"color": "k", "ls": "--", "lw": 0.8}  # the summary's 100 % line
LABEL_BOX = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"}  # legible over lines
TIME_AXIS = "time since migration start (s)"


def draw(doc: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Writes every figure the document supports into `out`; returns (title, file name),
    the summary first."""
    if doc["kind"] == "sweep":
        figures = [("Total time and guest slowdown against " + doc["sweep"]["axis"], "sweep.png", sweep_figure)]
    else:
        figures = [
            ("Summary: which migrates fastest and hurts the guest least", SUMMARY_PNG, summary_figure),
            ("Guest progress per vCPU (% of its pace before migration)", "progress.png", progress_figure),
            ("Stress programs: ms per GiB written", "ms-per-gib.png", ms_per_gib_figure),
            ("Remaining bytes; dirty rate vs bandwidth", "migration.png", migration_figure),
            ("Throttling over time", "throttle.png", throttle_figure),
        ]
    return render(doc, figures, out)


def render(doc: dict[str, Any], figures: list[tuple[str, str, Callable]], out: Path) -> list[tuple[str, str]]:
    """Draws each (title, file name, make(doc)) into `out`; a make that returns None has
    nothing to show for this document. Returns (title, file name) of those written."""
    written = []
    with plt.rc_context(STYLE):
        for title, name, make in figures:
            fig = make(doc)
            if fig is None:
                continue
            _save(fig, out / name)
            plt.close(fig)
            written.append((title, name))
    return written


def _save(fig: Figure, path: Path) -> None:
    """PNG with a 64-colour palette: a third of the size, for reports and committed docs."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=PALETTE).save(path, optimize=True)


# -- helpers -------------------------------------------------------------------------------------


def _runs_with_series(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["runs"] if "series" in r]


def _rows(n: int, cols: int = 1) -> tuple[Figure, np.ndarray]:
    """One row per policy: every panel on one time axis, each column on one y axis."""
    return plt.subplots(
        n, cols, figsize=(WIDTH, ROW * n + 0.7), squeeze=False, sharex=True, sharey="col", layout="constrained"
    )


def _class_colors(vcpus: list[dict[str, Any]]) -> list[Any]:
    """A color per writer: shades of one color per class."""
    colors = []
    for v in vcpus:
        same = [w for w in vcpus if w["class"] == v["class"]]
        shade = 0.85 - 0.45 * (same.index(v) / max(1, len(same) - 1)) if len(same) > 1 else 0.7
        colors.append(plt.get_cmap(CLASS_MAPS.get(v["class"], "Greys"))(shade))
    return colors


def _vcpu_labels(vcpus: list[dict[str, Any]], suffix: str = "") -> list[str]:
    """Legend labels: each vCPU by name, or with many vCPUs one entry per class (a class of
    one still by name)."""
    labels, seen = [], set()
    for v in vcpus:
        n = sum(w["class"] == v["class"] for w in vcpus)
        if len(vcpus) <= LEGEND_VCPUS or n == 1:
            labels.append(f"{v['name']} ({v['class']}, {v.get('program', '?')}){suffix}")
        else:
            labels.append("_nolegend_" if v["class"] in seen else f"{v['class']}s ({n} vCPUs){suffix}")
        seen.add(v["class"])
    return labels


def _smooth(ys: np.ndarray, n: int = SMOOTH) -> np.ndarray:
    if len(ys) < n:
        return ys
    kernel = np.ones(n) / n
    padded = np.concatenate([np.full(n - 1, ys[0]), ys])
    return np.convolve(padded, kernel, mode="valid")


def _events(run: dict[str, Any]) -> dict[str, Any]:
    m = run["series"]["migration"]
    syncs = [t for t, e in zip(m["t"], m["event"], strict=True) if e == "sync"]
    stop = next((t for t, e in zip(m["t"], m["event"], strict=True) if e == "stop"), None)
    end = m["t"][-1] if m["t"] else None
    return {"syncs": syncs, "stop": stop, "end": end}


MARKS = {  # how _mark draws each event, shared with the legend's entries for them
    "migration starts": {"color": "k", "ls": "--", "lw": 0.8},
    "dirty sync (iteration)": {"color": "k", "lw": 0.8},
    "switchover": {"color": "tab:green", "lw": 1.2},
    "gave up": {"color": "tab:gray", "lw": 1.2, "ls": ":"},
}


def _mark(ax: Axes, run: dict[str, Any]) -> None:
    """Migration start (t = 0), every dirty sync (ticks on top), and the switchover."""
    ev = _events(run)
    ax.axvline(0, **MARKS["migration starts"])
    for t in ev["syncs"]:
        ax.axvline(t, ymin=0.93, ymax=1.0, **MARKS["dirty sync (iteration)"])
    if ev["stop"] is not None:
        ax.axvline(ev["stop"], **MARKS["switchover"])
    elif ev["end"] is not None:
        ax.axvline(ev["end"], **MARKS["gave up"])


def _title(ax: Axes, run: dict[str, Any]) -> None:
    outcome = f"converged in {run['total-time'] / 1000:.1f} s" if run["converged"] else "did not converge"
    changes = [c["policy"] for c in run.get("policy-changes", [])[1:]]
    extra = f"; switched to {', '.join(changes)}" if changes else ""
    ax.set_title(f"{run['policy']}: {outcome}{extra}", loc="left")


def _legend(fig: Figure, extra: dict[str, Artist] | None = None, **where: Any) -> None:
    """One legend for the whole figure, outside the panels, so it never covers data: every
    labelled line of every panel (twin axes included) once, then `extra` entries."""
    handles: dict[str, Artist] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    handles |= extra or {}
    fig.legend(list(handles.values()), list(handles), **({"loc": "outside right upper"} | where))


def _event_handles() -> dict[str, Artist]:
    """Legend entries for the marks `_mark` draws."""
    handles: dict[str, Artist] = {}
    for label, style in MARKS.items():
        tick = {"marker": "|", "ls": "", "ms": 9, "mew": style["lw"]} if label.startswith("dirty sync") else {}
        handles[label] = Line2D([], [], **{**style, **tick})
    return handles


def _time_axis(fig: Figure, axes: np.ndarray, from_zero: bool = True) -> None:
    """Labels the shared time axis, starts each column's shared y axis at 0 (once every row
    is drawn: a limit set earlier would freeze the top at the first rows' data), adds the
    legend."""
    for ax in axes[-1]:
        ax.set_xlabel(TIME_AXIS)
    if from_zero:
        for ax in axes[0]:
            ax.set_ylim(bottom=0)
    _legend(fig, _event_handles())


# -- the summary ---------------------------------------------------------------------------------


def summary_figure(doc: dict[str, Any]) -> Figure | None:
    """Per policy, on one policy axis: total time, downtime, and each class's pace kept."""
    runs = doc["runs"]
    if not runs:
        return None
    fig, axes = plt.subplots(
        1, 3, figsize=(WIDTH, 0.6 * len(runs) + 2.0), sharey=True, width_ratios=(1, 1, 1.3), layout="constrained"
    )
    y = np.arange(len(runs))
    _total_panel(axes[0], runs, y)
    _downtime_panel(axes[1], runs, y)
    _pace_panel(axes[2], runs, y)
    axes[0].set_yticks(y, [r["policy"] for r in runs])
    axes[0].invert_yaxis()  # policies top to bottom in the order they ran
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle("Which migrates fastest and hurts the guest least?", x=0.01, ha="left")
    extra = {
        "did not converge (time it was given)": Patch(facecolor="white", edgecolor="0.3", hatch="//"),
        "pace before migration": Line2D([], [], **BEFORE),
    }
    _legend(fig, extra, loc="outside lower center", ncols=3)
    return fig


def _policy_color(run: dict[str, Any], k: int) -> Any:
    return POLICY_COLORS.get(run["policy"], f"C{k}")


def _total_panel(ax: Axes, runs: list[dict[str, Any]], y: np.ndarray) -> None:
    """Total time; a run that gave up is drawn hollow, hatched, to the time it was given."""
    for k, run in enumerate(runs):
        color, ok = _policy_color(run, k), run["converged"]
        seconds = (run["total-time"] or 0) / 1000
        bar = ax.barh(y[k], seconds, color=color if ok else "white", edgecolor=color, hatch=None if ok else "//")
        ax.bar_label(bar, [f"{seconds:.1f}" if ok else f"gave up at {seconds:.0f} s"], padding=3)
    _room_for_labels(ax, [(r["total-time"] or 0) / 1000 for r in runs])
    ax.set_title("total time (s): shorter is better", loc="left")


def _downtime_panel(ax: Axes, runs: list[dict[str, Any]], y: np.ndarray) -> None:
    for k, run in enumerate(runs):
        ms = run["downtime"]
        bar = ax.barh(y[k], ms or 0, color=_policy_color(run, k))
        ax.bar_label(bar, [f"{ms:.0f}" if ms is not None else "no switchover"], padding=3)
    _room_for_labels(ax, [r["downtime"] or 0 for r in runs])
    ax.set_title("downtime (ms): shorter is better", loc="left")


def _room_for_labels(ax: Axes, values: list[float]) -> None:
    """An x range from 0 that leaves the longest bar room for its label."""
    ax.set_xlim(0, max(values, default=0) * 1.7 or 1)


def _pace_panel(ax: Axes, runs: list[dict[str, Any]], y: np.ndarray) -> None:
    """Each class's pace during the migration as a share of its pace before (100 % = unharmed);
    a diamond marks the same net of steal (per second the vCPU was not descheduled)."""
    classes = [c for c in CLASS_ORDER if any(c in r["slowdown"] for r in runs)]
    height = 0.8 / max(1, len(classes))
    for j, cls in enumerate(classes):
        kept = [(1 - r["slowdown"][cls]) * 100 if cls in r["slowdown"] else np.nan for r in runs]
        at = y - 0.4 + height * (j + 0.5)
        color = plt.get_cmap(CLASS_MAPS[cls])(0.7)
        bars = ax.barh(at, np.nan_to_num(kept), height=height, color=color, label=f"{cls}s' pace kept")
        ax.bar_label(bars, ["" if np.isnan(x) else f"{x:.0f}" for x in kept], padding=3, bbox=LABEL_BOX)
        net = [(1 - r["net-slowdown"][cls]) * 100 if cls in r.get("net-slowdown", {}) else np.nan for r in runs]
        ax.plot(net, at, ls="", marker="D", ms=5, color="0.15", label="net of steal" if j == 0 else None)
    ax.axvline(100, zorder=0.9, **BEFORE)  # behind the bars and their labels
    ax.set_title("guest pace kept (% of before)", loc="left")
    shown = [s for r in runs for key in ("slowdown", "net-slowdown") for s in r.get(key, {}).values()]
    ax.set_xlim(0, max(120, *(125 * (1 - s) for s in shown)))


# -- compare figures -----------------------------------------------------------------------------


def _per_vcpu(ax: Axes, t: np.ndarray, ys: np.ndarray, run: dict[str, Any], keep: Callable[[dict], bool]) -> None:
    """One line per vCPU that `keep` accepts, in its class's shade."""
    vcpus = run["vcpus"]
    for i, (v, color, label) in enumerate(zip(vcpus, _class_colors(vcpus), _vcpu_labels(vcpus), strict=True)):
        if keep(v):
            ax.plot(t, ys[:, i], color=color, lw=1.2, label=label)


def progress_figure(doc: dict[str, Any]) -> Figure | None:
    runs = _runs_with_series(doc)
    if not runs:
        return None
    fig, axes = _rows(len(runs))
    for ax, run in zip(axes[:, 0], runs, strict=True):
        g = run["series"]["guest"]
        t = np.array(g["t"])
        rates = np.array(g["progress-rate"], dtype=float).reshape(len(t), -1)
        base = np.array([v["baseline-rate"] for v in run["vcpus"]], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            pct = np.column_stack([_smooth(rates[:, i]) for i in range(rates.shape[1])]) / base * 100
        _per_vcpu(ax, t, pct, run, lambda v: v["baseline-rate"] > 0)
        _mark(ax, run)
        _title(ax, run)
        ax.axhline(100, color="0.6", lw=0.8)  # the pace before migration
        ax.set_ylabel("% of baseline")
    _time_axis(fig, axes)
    return fig


def ms_per_gib_figure(doc: dict[str, Any]) -> Figure | None:
    runs = [r for r in _runs_with_series(doc) if any(v.get("program") == "stress" for v in r["vcpus"])]
    if not runs:
        return None
    fig, axes = _rows(len(runs))
    for ax, run in zip(axes[:, 0], runs, strict=True):
        g = run["series"]["guest"]
        t = np.array(g["t"])
        ms = np.array(g["ms-per-gib"], dtype=float).reshape(len(t), -1)
        _per_vcpu(ax, t, np.where(ms > 0, ms, np.nan), run, lambda v: v.get("program") == "stress")
        _mark(ax, run)
        _title(ax, run)
        ax.set_ylabel("ms / GiB")
        ax.set_yscale("log")
    _time_axis(fig, axes, from_zero=False)
    return fig


def migration_figure(doc: dict[str, Any]) -> Figure | None:
    runs = _runs_with_series(doc)
    if not runs:
        return None
    fig, axes = _rows(len(runs), 2)
    for (left, right), run in zip(axes, runs, strict=True):
        m, g = run["series"]["migration"], run["series"]["guest"]
        t = np.array(m["t"])
        left.plot(t, _mib(m["remaining"]), color="k", lw=1.2, label="remaining")
        left.plot(t, _mib(m["threshold"]), color="tab:green", lw=0.8, ls="--", label="switchover threshold")
        left.set_ylabel("MiB")
        gt = np.array(g["t"])
        dirty = np.array(g["dirty-rate"], dtype=float).reshape(len(gt), -1).sum(axis=1) * m["page-size"] / MiB
        right.plot(gt, _smooth(dirty), color="tab:red", lw=1.2, label="guest dirty rate")
        right.plot(t, np.array(m["bandwidth"], dtype=float) / MiB, color="tab:blue", lw=1.2, label="bandwidth")
        right.set_ylabel("MiB/s")
        for ax in (left, right):
            _mark(ax, run)
        _title(left, run)
    _time_axis(fig, axes)
    return fig


def _mib(xs: list[Any]) -> np.ndarray:
    return np.array([np.nan if x is None else x / MiB for x in xs])


def throttle_figure(doc: dict[str, Any]) -> Figure | None:
    runs = _runs_with_series(doc)
    if not runs:
        return None
    fig, axes = _rows(len(runs))
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t, share = _asleep(run)
        vcpus = run["vcpus"]
        for i, (color, label) in enumerate(zip(_class_colors(vcpus), _vcpu_labels(vcpus, " asleep"), strict=True)):
            ax.step(t, share[:, i] * 100, where="pre", color=color, lw=1.2, label=label)
        ax.set_ylabel("% of time asleep")
        ax.set_ylim(-2, 102)
        _policy_signal(ax, run)
        _mark(ax, run)
        _title(ax, run)
    _time_axis(fig, axes, from_zero=False)
    return fig


def _asleep(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Share of each interval between samples that each writer spent in throttle sleeps.

    A sleep is counted when it ends, so one 990 ms sleep shows up in a single 100 ms sample:
    each sample's sleep is laid back over the preceding intervals until they are full,
    which puts it where it happened. Results without raw sleep counters fall back to the
    sampler's (per-sample, clipped) shares."""
    m = run["series"]["migration"]
    if "sleep-ns" not in m:
        g = run["series"]["guest"]
        return np.array(g["t"]), np.array(g["sleep-share"], dtype=float).reshape(len(g["t"]), -1)
    keep = _spaced(m["t"])  # a sync right after a tick would make a 2 ms interval of "0 %"
    t = np.array(m["t"], dtype=float)[keep]
    slept = np.diff(np.array(m["sleep-ns"], dtype=float)[keep], axis=0, prepend=0) / 1e9
    slept[0] = 0
    span = np.diff(t, prepend=t[0])
    filled = np.zeros_like(slept)
    for i in range(slept.shape[1]):
        for k in range(1, len(t)):
            left, j = slept[k, i], k
            while left > 1e-9 and j >= 1:
                take = min(span[j] - filled[j, i], left)
                filled[j, i] += take
                left -= take
                j -= 1
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(span[:, None] > 0, filled / span[:, None], 0.0)
    return t, np.clip(share, 0, 1)


def _spaced(t: list[float], gap: float = 0.05) -> list[int]:
    """Indexes of samples at least `gap` s apart, the first and the last always kept."""
    keep = [0]
    for i in range(1, len(t)):
        if t[i] - t[keep[-1]] >= gap or i == len(t) - 1:
            keep.append(i)
    return keep


def _policy_signal(ax: Axes, run: dict[str, Any]) -> None:
    """The policy's own control variable: auto-converge's percentage on the same axis,
    dirty-limit's sleep per ring-full and dirty-quota's pool on a second axis."""
    m = run["series"]["migration"]
    t = np.array(m["t"])
    pct = m["cpu-throttle-percentage"]
    if any(pct):
        ys = np.array([np.nan if x is None else x for x in pct], dtype=float)
        ax.step(t, ys, where="post", color="k", lw=1.0, label="cpu-throttle-percentage")
    sleeps = m["dirty-limit-sleep-us"]
    if any(s and any(s) for s in sleeps):
        twin = ax.twinx()
        n = max(len(s) for s in sleeps if s)
        ys = np.array([s if s else [np.nan] * n for s in sleeps], dtype=float) / 1000
        colors = _class_colors(run["vcpus"])  # dashed in the vCPU's own colour
        for i in range(n):
            color = colors[i] if i < len(colors) else f"C{i}"
            twin.step(t, ys[:, i], where="post", lw=0.9, ls="--", color=color, label=f"vcpu{i} sleep/ring-full")
        twin.set_ylabel("ms per ring-full")
    pool = m["dirty-quota-pool"]
    if any(p is not None for p in pool):
        twin = ax.twinx()
        ys = np.array([np.nan if p is None else p for p in pool], dtype=float)
        twin.plot(t, ys, color="tab:purple", lw=0.9, ls="--", label="quota pool")
        twin.set_ylabel("pool (pages)")
        twin.set_ylim(bottom=0)


# -- sweep figure --------------------------------------------------------------------------------

SWEEP_PANELS = (
    ("total-time", "total time (s)", 1 / 1000),
    ("slowdown-writer", "writers' slowdown (%)", 100),
    ("slowdown-reader", "readers' slowdown (%)", 100),
)


def sweep_figure(doc: dict[str, Any]) -> Figure:
    points = sweeps.summarize(doc)
    sw = doc["sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(WIDTH * 1.2, 3.8), layout="constrained")
    axes[2].sharey(axes[1])  # writers and readers on one scale
    for ax, (key, label, scale) in zip(axes, SWEEP_PANELS, strict=True):
        for k, policy in enumerate(doc["policies"]):
            mine = [p for p in points if p["policy"] == policy and p[key]["median"] is not None]
            color = POLICY_COLORS.get(policy, f"C{k}")
            dodge = _dodge_by(k, len(doc["policies"]), bool(sw.get("log")), sw["x"])
            _sweep_line(ax, mine, key, scale, color, policy, dodge)
            net = [p for p in mine if p.get(f"net-{key}", {}).get("median") is not None]
            if key.startswith("slowdown-") and net:  # net of steal, dashed, beside the raw
                xs = dodge(np.array([p["x"] for p in net], dtype=float))
                ys = np.array([p[f"net-{key}"]["median"] for p in net]) * scale
                ax.plot(xs, ys, ls="--", marker="D", ms=4, color=color, lw=1)
        ax.set_xlabel(sw["axis"])
        ax.set_ylabel(label)
        if sw.get("log") and all(x > 0 for x in sw["x"]):
            ax.set_xscale("log")
        ax.set_xticks(sw["x"], sw["labels"])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    _cap_line(axes[0], points)
    hollow = Line2D([], [], marker="o", ls="", color="0.3", mfc="white", mew=1.5)
    net = Line2D([], [], ls="--", marker="D", ms=4, color="0.3", lw=1)
    _legend(fig, {"did not converge": hollow, "slowdown net of steal": net})
    fig.suptitle(
        f"median over {sw['repeat']} run(s), bars min-max; k/n = runs of n that converged; a run that did "
        "not converge counts with the time it was given",
        x=0.01,
        ha="left",
        fontsize=10,
    )
    return fig


def _cap_line(ax: Axes, points: list[dict[str, Any]]) -> None:
    """The time cap (x-max-time) the non-converging runs hit."""
    caps = {p["cap"] for p in points if p["cap"] and p["converged"] < p["runs"]}
    for cap in caps:
        ax.axhline(cap / 1000, color="0.5", ls=":", lw=1, label="cap (x-max-time)")


def _sweep_line(ax: Axes, pts: list[dict[str, Any]], key: str, scale: float, color: Any, label: str, dodge) -> None:
    if not pts:
        return
    xs = dodge(np.array([p["x"] for p in pts], dtype=float))
    med = np.array([p[key]["median"] for p in pts]) * scale
    lo = med - np.array([p[key]["min"] for p in pts]) * scale
    hi = np.array([p[key]["max"] for p in pts]) * scale - med
    ax.errorbar(xs, med, yerr=[lo, hi], color=color, lw=1.2, capsize=3, label=label)
    for x, y, p in zip(xs, med, pts, strict=True):
        ok = p["converged"] == p["runs"]
        ax.plot(x, y, "o", color=color, mfc=color if ok else "white", mew=1.5, ms=7)
        if 0 < p["converged"] < p["runs"]:
            text = f"{p['converged']}/{p['runs']}"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, -12), color=color)


def _dodge_by(k: int, n: int, log: bool, all_x: list[float]) -> Any:
    """Shifts policy k's markers a little sideways, so points that overlap stay visible."""
    offset = (k - (n - 1) / 2) * 0.03 if n > 1 else 0.0
    span = (max(all_x) - min(all_x)) or 1.0

    def shift(xs: np.ndarray) -> np.ndarray:
        return xs * (1 + offset) if log else xs + offset * span

    return shift
