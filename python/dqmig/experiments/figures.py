"""The report's figures (matplotlib, Agg, PNG), drawn from a results document alone.

Compare: guest progress per vCPU (and ms/GiB for stress programs), remaining bytes and dirty
rate vs bandwidth, and throttling, each with one row per policy and the migration's start,
its dirty syncs (iterations) and the switchover drawn in. Sweep: total time and guest
slowdown against the swept value, one line per policy, with "did not converge" drawn hollow
at the cap.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib's own dependency)

from dqmig.experiments import sweep as sweeps  # noqa: E402

DPI = 80
PALETTE = 64  # colours per PNG
WIDTH = 10.0  # inches
ROW = 2.3  # inches per policy row
SMOOTH = 5  # samples (100 ms each) in the rolling mean of guest pace
CLASS_MAPS = {"writer": "Reds", "reader": "Blues", "idle": "Greys", "device": "Purples"}
POLICY_COLORS = {"none": "tab:gray", "auto-converge": "tab:red", "dirty-limit": "tab:orange", "dirty-quota": "tab:blue"}
MB = 1e6


def draw(doc: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Writes every figure the document supports into `out`; returns (title, file name)."""
    if doc["kind"] == "sweep":
        figures = [("Total time and guest slowdown against " + doc["sweep"]["axis"], "sweep.png", sweep_figure)]
    else:
        figures = [
            ("Guest progress per vCPU (% of its pace before migration)", "progress.png", progress_figure),
            ("Stress programs: ms per GiB written", "ms-per-gib.png", ms_per_gib_figure),
            ("Remaining bytes; dirty rate vs bandwidth", "migration.png", migration_figure),
            ("Throttling over time", "throttle.png", throttle_figure),
        ]
    written = []
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
    fig, axes = plt.subplots(n, cols, figsize=(WIDTH, ROW * n + 0.6), squeeze=False, layout="constrained")
    return fig, axes


def _class_colors(vcpus: list[dict[str, Any]]) -> list[Any]:
    """A color per writer: shades of one color per class."""
    colors = []
    for v in vcpus:
        same = [w for w in vcpus if w["class"] == v["class"]]
        shade = 0.85 - 0.45 * (same.index(v) / max(1, len(same) - 1)) if len(same) > 1 else 0.7
        colors.append(plt.get_cmap(CLASS_MAPS.get(v["class"], "Greys"))(shade))
    return colors


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


def _mark(ax: Axes, run: dict[str, Any]) -> None:
    """Migration start (t = 0), every dirty sync (ticks on top), and the switchover."""
    ev = _events(run)
    ax.axvline(0, color="k", ls="--", lw=0.8)
    for t in ev["syncs"]:
        ax.axvline(t, ymin=0.93, ymax=1.0, color="k", lw=0.8)
    if ev["stop"] is not None:
        ax.axvline(ev["stop"], color="tab:green", lw=1.2)
    elif ev["end"] is not None:
        ax.axvline(ev["end"], color="tab:gray", lw=1.2, ls=":")


def _title(ax: Axes, run: dict[str, Any]) -> None:
    outcome = f"converged in {run['total-time'] / 1000:.1f} s" if run["converged"] else "did not converge"
    changes = [c["policy"] for c in run.get("policy-changes", [])[1:]]
    extra = f"; switched to {', '.join(changes)}" if changes else ""
    ax.set_title(f"{run['policy']}: {outcome}{extra}", fontsize=10, loc="left")


def _legend_note(fig: Figure) -> None:
    fig.suptitle(
        "dashed: migration starts; ticks on top: dirty syncs (iterations); green: switchover; dotted: gave up",
        fontsize=8,
        color="0.3",
        x=0.01,
        ha="left",
    )


# -- compare figures -----------------------------------------------------------------------------


def progress_figure(doc: dict[str, Any]) -> Figure | None:
    runs = _runs_with_series(doc)
    if not runs:
        return None
    fig, axes = _rows(len(runs))
    for ax, run in zip(axes[:, 0], runs, strict=True):
        g = run["series"]["guest"]
        t = np.array(g["t"])
        rates = np.array(g["progress-rate"], dtype=float).reshape(len(t), -1)
        for i, (v, color) in enumerate(zip(run["vcpus"], _class_colors(run["vcpus"]), strict=True)):
            if v["baseline-rate"] <= 0:
                continue
            ax.plot(t, _smooth(rates[:, i]) / v["baseline-rate"] * 100, color=color, lw=1.2, label=_label(v))
        _mark(ax, run)
        _title(ax, run)
        ax.set_ylabel("% of baseline")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="lower left", ncols=4)
    axes[-1, 0].set_xlabel("time since migration start (s)")
    _legend_note(fig)
    return fig


def _label(v: dict[str, Any]) -> str:
    return f"{v['name']} ({v['class']}, {v.get('program', '?')})"


def ms_per_gib_figure(doc: dict[str, Any]) -> Figure | None:
    runs = [r for r in _runs_with_series(doc) if any(v.get("program") == "stress" for v in r["vcpus"])]
    if not runs:
        return None
    fig, axes = _rows(len(runs))
    for ax, run in zip(axes[:, 0], runs, strict=True):
        g = run["series"]["guest"]
        t = np.array(g["t"])
        ms = np.array(g["ms-per-gib"], dtype=float).reshape(len(t), -1)
        for i, (v, color) in enumerate(zip(run["vcpus"], _class_colors(run["vcpus"]), strict=True)):
            if v.get("program") == "stress":
                ax.plot(t, np.where(ms[:, i] > 0, ms[:, i], np.nan), color=color, lw=1.2, label=_label(v))
        _mark(ax, run)
        _title(ax, run)
        ax.set_ylabel("ms / GiB")
        ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper left")
    axes[-1, 0].set_xlabel("time since migration start (s)")
    _legend_note(fig)
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
        left.legend(fontsize=8, loc="upper right")
        gt = np.array(g["t"])
        dirty = np.array(g["dirty-rate"], dtype=float).reshape(len(gt), -1).sum(axis=1) * m["page-size"] / MB
        right.plot(gt, _smooth(dirty), color="tab:red", lw=1.2, label="guest dirty rate")
        right.plot(t, np.array(m["bandwidth"], dtype=float) / MB, color="tab:blue", lw=1.2, label="bandwidth")
        right.set_ylabel("MB/s")
        right.legend(fontsize=8, loc="upper right")
        for ax in (left, right):
            _mark(ax, run)
            ax.set_ylim(bottom=0)
        _title(left, run)
    for ax in axes[-1]:
        ax.set_xlabel("time since migration start (s)")
    _legend_note(fig)
    return fig


def _mib(xs: list[Any]) -> np.ndarray:
    return np.array([np.nan if x is None else x / 2**20 for x in xs])


def throttle_figure(doc: dict[str, Any]) -> Figure | None:
    runs = _runs_with_series(doc)
    if not runs:
        return None
    fig, axes = _rows(len(runs))
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t, share = _asleep(run)
        for i, (v, color) in enumerate(zip(run["vcpus"], _class_colors(run["vcpus"]), strict=True)):
            ax.step(t, share[:, i] * 100, where="pre", color=color, lw=1.2, label=f"{v['name']} asleep")
        ax.set_ylabel("% of time asleep")
        ax.set_ylim(-2, 102)
        _policy_signal(ax, run)
        _mark(ax, run)
        _title(ax, run)
        ax.legend(fontsize=8, loc="upper left", ncols=3)
    axes[-1, 0].set_xlabel("time since migration start (s)")
    _legend_note(fig)
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
        for i in range(n):
            twin.step(t, ys[:, i], where="post", lw=0.9, ls="--", color=f"C{i + 4}", label=f"vcpu{i} sleep/ring-full")
        twin.set_ylabel("ms per ring-full")
        twin.legend(fontsize=8, loc="upper right")
    pool = m["dirty-quota-pool"]
    if any(p is not None for p in pool):
        twin = ax.twinx()
        ys = np.array([np.nan if p is None else p for p in pool], dtype=float)
        twin.plot(t, ys, color="tab:purple", lw=0.9, ls="--", label="quota pool")
        twin.set_ylabel("pool (pages)")
        twin.set_ylim(bottom=0)
        twin.legend(fontsize=8, loc="upper right")


# -- sweep figure --------------------------------------------------------------------------------

SWEEP_PANELS = (
    ("total-time", "total time (s)", 1 / 1000),
    ("slowdown-writer", "writers' slowdown (%)", 100),
    ("slowdown-reader", "readers' slowdown (%)", 100),
)


def sweep_figure(doc: dict[str, Any]) -> Figure:
    points = sweeps.summarize(doc)
    sw = doc["sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(WIDTH * 1.2, 3.6), layout="constrained")
    for ax, (key, label, scale) in zip(axes, SWEEP_PANELS, strict=True):
        for k, policy in enumerate(doc["policies"]):
            mine = [p for p in points if p["policy"] == policy and p[key]["median"] is not None]
            color = POLICY_COLORS.get(policy, f"C{k}")
            dodge = _dodge_by(k, len(doc["policies"]), bool(sw.get("log")), sw["x"])
            _sweep_line(ax, mine, key, scale, color, policy, dodge)
        ax.set_xlabel(sw["axis"])
        ax.set_ylabel(label)
        if sw.get("log") and all(x > 0 for x in sw["x"]):
            ax.set_xscale("log")
        ax.set_xticks(sw["x"], sw["labels"], fontsize=8)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    _cap_line(axes[0], points)
    handles, labels = axes[0].get_legend_handles_labels()
    hollow = Line2D([], [], marker="o", ls="", color="0.3", mfc="white", mew=1.5, label="did not converge")
    axes[0].legend([*handles, hollow], [*labels, "did not converge"], fontsize=8, loc="center left")
    fig.suptitle(
        f"median over {sw['repeat']} run(s), bars min-max; hollow = did not converge within the cap "
        "(total time then = the time it was given; slowdown measured until it gave up); "
        "k/n = runs of n that converged",
        fontsize=8,
        color="0.3",
        x=0.01,
        ha="left",
    )
    return fig


def _cap_line(ax: Axes, points: list[dict[str, Any]]) -> None:
    """The time cap (x-max-time) the non-converging runs hit."""
    caps = {p["cap"] for p in points if p["cap"] and p["converged"] < p["runs"]}
    for cap in caps:
        ax.axhline(cap / 1000, color="0.5", ls=":", lw=1)
        ax.annotate("cap (x-max-time)", (0.02, cap / 1000), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")


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
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7, color=color)


def _dodge_by(k: int, n: int, log: bool, all_x: list[float]) -> Any:
    """Shifts policy k's markers a little sideways, so points that overlap stay visible."""
    offset = (k - (n - 1) / 2) * 0.03 if n > 1 else 0.0
    span = (max(all_x) - min(all_x)) or 1.0

    def shift(xs: np.ndarray) -> np.ndarray:
        return xs * (1 + offset) if log else xs + offset * span

    return shift
