"""Results: the metrics, the saved schema (errors name the field), tables, and a report
redrawn from a saved results.json alone (figures, tables, one self-contained HTML page)."""

from __future__ import annotations

import copy
import json
import re

import pytest
from matplotlib import pyplot as plt
from matplotlib.text import Text
from PIL import Image

from dqmig.cli import main
from dqmig.experiments import figures, metrics, report, results, scenario, sweep
from dqmig.experiments.results import ResultsError

PNG = b"\x89PNG\r\n\x1a\n"


# -- fabricated results in the runner's shape ------------------------------------------------


def fake_run(policy: str, converged: bool, *, series: bool = True, slow: float = 0.5) -> dict:
    n = 30
    t = [round(-1 + i * 0.1, 3) for i in range(n)]
    vcpus = [
        {"name": "vcpu0", "class": "writer", "program": "uniform", "baseline-rate": 1000.0},
        {"name": "vcpu1", "class": "reader", "program": "stress", "baseline-rate": 5000.0},
    ]
    for v, kept in zip(vcpus, (1 - slow, 0.95), strict=True):
        v.update({"migration-rate": v["baseline-rate"] * kept, "retained": kept, "slowdown": 1 - kept, "sleep": 0.2})
    run = {
        "policy": policy,
        "seed": 0,
        "status": "completed" if converged else "cancelled",
        "converged": converged,
        "error": None if converged else "did not converge within 2 s",
        "total-time": 1800 if converged else 2000,
        "downtime": 40 if converged else None,
        "setup-time": 10,
        "transferred": 50 << 20,
        "iterations": 6,
        "peak-throttle": 80.0,
        "vcpus": vcpus,
        "slowdown": metrics.class_means(vcpus, "slowdown"),
        "fairness": metrics.jain([v["retained"] for v in vcpus]),
        "policy-changes": [{"t": 0.0, "policy": policy, "reason": "setup"}],
        "parameters": {"x-max-time": 2.0},
        "host": {"load-before": [0.5, 0.4, 0.3], "load-after": [1.5, 0.7, 0.4], "steal": 0.125},
    }
    if series:
        m_t = [x for x in t if x >= 0]
        k = len(m_t)
        run["series"] = {
            "guest": {
                "t": t,
                "progress-rate": [[900.0, 4800.0]] * n,
                "dirty-rate": [[4000.0, 0.0]] * n,
                "sleep-share": [[0.3, 0.0]] * n,
                "ms-per-gib": [[0.0, 250.0]] * n,
            },
            "migration": {
                "t": m_t,
                "event": ["setup"] + ["tick", "sync"] * ((k - 2) // 2) + ["tick"] * ((k - 2) % 2) + ["stop"],
                "policy": [policy] * k,
                "remaining": [int(64e6 - i * 3e6) for i in range(k)],
                "transferred": [int(i * 3e6) for i in range(k)],
                "bandwidth": [33_000_000] * k,
                "dirty-pages-rate": [4000] * k,
                "threshold": [9_000_000] * k,
                "cpu-throttle-percentage": [min(99, 20 + 10 * i) for i in range(k)],
                "dirty-limit-sleep-us": [[i * 100, 0] for i in range(k)],
                "dirty-quota-pool": [i * 3 for i in range(k)],
                "dirty-quota-limit": [4000] * k,
                "page-size": 4096,
            },
        }
    return run


def fake_compare() -> dict:
    doc = results.new("compare", scenario.load("default").to_dict(), ["none", "dirty-quota"], ["compare"])
    doc["runs"] = [fake_run("none", False), fake_run("dirty-quota", True)]
    return doc


def fake_sweep() -> dict:
    doc = results.new("sweep", scenario.load("default").to_dict(), ["none", "dirty-quota"], ["sweep"])
    doc["sweep"] = {
        "name": "bandwidth",
        "field": "max-bandwidth",
        "axis": "max-bandwidth (log scale)",
        "log": True,
        "values": [12_500_000, 125_000_000],
        "x": [11.9, 119.2],
        "labels": ["100Mbit", "1Gbit"],
        "repeat": 2,
    }
    for rep in range(2):
        for point in range(2):
            doc["runs"].append({**fake_run("none", point == 1 and rep == 0, series=False), "point": point})
            doc["runs"].append({**fake_run("dirty-quota", True, series=False, slow=0.3 + rep * 0.2), "point": point})
    return doc


# -- metrics ---------------------------------------------------------------------------------


def test_jain_index():
    assert metrics.jain([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert metrics.jain([1.0, 0.0]) == pytest.approx(0.5)
    assert metrics.jain([1.0, 0.5]) == pytest.approx(0.9)
    assert metrics.jain([]) is None and metrics.jain([0.0, 0.0]) is None


def test_slowdown_helpers():
    assert metrics.retained(0, 5) is None
    assert metrics.retained(200, 150) == 0.75
    vcpus = [{"class": "writer", "x": 0.2}, {"class": "writer", "x": 0.4}, {"class": "idle", "x": None}]
    assert metrics.class_means(vcpus, "x") == pytest.approx({"writer": 0.3})
    assert metrics.spread([3, None, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert metrics.spread([None])["median"] is None


# -- the schema ------------------------------------------------------------------------------


def test_pace_separates_steal_from_the_policy():
    # 10 s of wall time: 6 s on the CPU and 2 s in a throttle sleep are the vCPU's own; the
    # 2 s left were stolen by the host. Net pace counts only the 8 s.
    p = metrics.pace(800, 10.0, 8.0)
    assert p.rate == 80 and p.net_rate == 100 and p.steal == pytest.approx(0.2)
    assert metrics.pace(100, 10.0, 10.4).steal == 0, "clock granularity never makes steal negative"
    assert metrics.pace(0, 0.0, 0.0) == metrics.Pace(0.0, 0.0, 0.0)
    # A host that steals half the time halves the raw pace, not the net one.
    quiet, busy = metrics.pace(1000, 1.0, 1.0), metrics.pace(500, 1.0, 0.5)
    assert metrics.retained(quiet.rate, busy.rate) == 0.5
    assert metrics.retained(quiet.net_rate, busy.net_rate) == 1.0


def test_results_carry_what_it_takes_to_trace_and_rerun():
    doc = fake_compare()
    results.validate(doc)
    assert doc["schema"] == results.SCHEMA and doc["dqmig"]
    assert {"cpus", "memory", "python", "platform"} <= set(doc["machine"])
    assert doc["git"] is None or re.fullmatch(r"[0-9a-f]{40}", doc["git"]["commit"])
    rerun = scenario.loads(scenario.dump_toml(doc["scenario"]))
    assert rerun == scenario.load("default")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("machine"), "machine: missing"),
        (lambda d: d.update(schema="other/9"), "schema: expected 'dqmig-results/1'"),
        (lambda d: d.update(kind="race"), "kind: expected one of"),
        (lambda d: d["runs"][1].pop("downtime"), "runs[1].downtime: missing"),
        (lambda d: d["runs"][0].update(converged="yes"), "runs[0].converged: expected true/false, not str"),
        (lambda d: d["runs"][0].update(iterations=True), "runs[0].iterations: expected a number, not a boolean"),
        (lambda d: d["runs"][1]["vcpus"][0].pop("class"), "runs[1].vcpus[0].class: missing"),
        (lambda d: d["runs"][0].update(series=[]), "runs[0].series: expected tables"),
        (lambda d: d.update(runs={}), "runs: expected a list"),
        (lambda d: d["runs"][0]["host"].pop("steal"), "runs[0].host.steal: missing"),
    ],
)
def test_bad_results_name_the_field(change, message):
    doc = fake_compare()
    change(doc)
    with pytest.raises(ResultsError) as e:
        results.validate(doc)
    assert message in str(e.value)


STAT = """cpu  1000 20 300 8000 50 0 30 600 40 0
cpu0 500 10 150 4000 25 0 15 300 20 0
intr 12345
"""


def test_steal_is_the_share_of_cpu_time_stolen_over_the_run():
    before = results.cpu_jiffies(STAT)
    assert before == [1000, 20, 300, 8000, 50, 0, 30, 600, 40, 0]  # the aggregate line, not cpu0
    after = [2000, 20, 600, 8300, 50, 0, 30, 1000, 90, 0]  # +1000 user (incl. guest), +300 sys, +300 idle, +400 steal
    usage = results.host_usage(
        {"load-average": [0.5, 0.4, 0.3], "jiffies": before}, {"load-average": [1.0, 0.5, 0.3], "jiffies": after}
    )
    assert usage == {"load-before": [0.5, 0.4, 0.3], "load-after": [1.0, 0.5, 0.3], "steal": pytest.approx(0.2)}
    assert results.cpu_jiffies(None) is None and results.cpu_jiffies("intr 1\n") is None
    idle = [0.0, 0.0, 0.0]
    unknown = results.host_usage({"load-average": idle, "jiffies": None}, {"load-average": idle, "jiffies": after})
    assert unknown["steal"] is None  # no /proc/stat: steal unknown, not zero


def test_a_live_host_snapshot_is_in_range():
    a = results.host_snapshot()
    usage = results.host_usage(a, results.host_snapshot())
    assert len(usage["load-after"]) == 3 and all(x >= 0 for x in usage["load-after"])
    assert usage["steal"] is None or 0 <= usage["steal"] <= 1


def test_a_sweep_needs_its_definition_and_point_indexes():
    doc = fake_sweep()
    results.validate(doc)
    broken = copy.deepcopy(doc)
    broken.pop("sweep")
    with pytest.raises(ResultsError, match="sweep: expected an object"):
        results.validate(broken)
    doc["runs"][2].pop("point")
    with pytest.raises(ResultsError, match=r"runs\[2\]\.point"):
        results.validate(doc)


def test_loading_names_the_file(tmp_path):
    with pytest.raises(ResultsError, match="no such results file"):
        results.load(tmp_path / "nothing.json")
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not JSON"):
        results.load(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"schema": results.SCHEMA}))
    with pytest.raises(ResultsError, match=r"results\.json: kind: missing"):
        results.load(tmp_path)


# -- tables and reports ----------------------------------------------------------------------


def test_sweep_points_summarise_repetitions():
    points = sweep.summarize(fake_sweep())
    none_100 = next(p for p in points if p["label"] == "100Mbit" and p["policy"] == "none")
    assert (none_100["converged"], none_100["runs"]) == (0, 2)
    dq = next(p for p in points if p["label"] == "1Gbit" and p["policy"] == "dirty-quota")
    assert dq["slowdown-writer"]["min"] == pytest.approx(0.3) and dq["slowdown-writer"]["max"] == pytest.approx(0.5)
    text = report.text(fake_sweep())
    assert "0/2" in text and "1/2" in text and "+40.0 [+30.0..+50.0]" in text
    assert dq["steal"]["median"] == pytest.approx(0.125) and "load 1m at end" in text


def three_policies() -> dict:
    """none fails but disturbs least; dirty-quota is fastest; auto-converge spares the writer."""
    doc = fake_compare()
    ac = fake_run("auto-converge", True, slow=0.1)
    ac.update({"total-time": 6000, "downtime": 40})  # ties dirty-quota's downtime
    doc["runs"].insert(1, ac)
    doc["runs"][0]["slowdown"] = {"writer": -0.01, "reader": -0.02}
    return doc


def test_the_best_value_of_each_column_is_marked_among_converged_runs():
    table = report.tables_for(three_policies())[0]
    col = {h: i for i, h in enumerate(table.headers)}
    none, ac, dq = 0, 1, 2
    assert {(dq, col["total s"]), (ac, col["downtime ms"]), (dq, col["downtime ms"])} <= table.best
    assert (ac, col["writers slowdown %"]) in table.best and (dq, col["writers slowdown %"]) not in table.best
    assert not any(r == none for r, _ in table.best), "a run that did not converge is never best"
    assert not any(c in (col["converged"], col["peak throttle %"], col["host steal %"]) for _, c in table.best)
    text = table.text().splitlines()
    assert text[2 + dq].split()[2] == "1.8*" and text[2 + ac].split()[2] == "6.0"
    assert text[-1] == "* best in its column among the runs that converged"
    cells = re.findall(r"<td( class=\"best\")?>([^<]*)</td>", table.html())
    row = cells[dq * len(table.headers) : (dq + 1) * len(table.headers)]
    marked = [table.headers[i] for i, (best, _) in enumerate(row) if best]
    assert marked == ["total s", "downtime ms", "sent MiB", "iters", "readers slowdown %"]  # ties are all marked


def test_a_sweep_marks_the_best_policy_at_each_value():
    doc = fake_sweep()
    for r in doc["runs"]:
        r.update(converged=True, **{"total-time": 1000 + 500 * r["point"] + (300 if r["policy"] == "none" else 0)})
    table = report.tables_for(doc)[0]
    total = table.headers.index("total s")
    assert {(r, c) for r, c in table.best if c == total} == {(1, total), (3, total)}  # dirty-quota at both values


def test_one_converged_run_is_not_the_best_of_anything():
    table = report.tables_for(fake_compare())[0]
    assert table.best == set() and "*" not in table.text()


def test_host_load_and_steal_stand_next_to_the_slowdowns():
    table = report.tables_for(fake_compare())[0]
    at = table.headers.index("readers slowdown %")
    assert table.headers[at + 1 : at + 5] == ["writers net %", "readers net %", "load 1m", "host steal %"]
    assert [row[at + 3 : at + 5] for row in table.rows] == [["0.5→1.5", "12.5"]] * 2
    old = fake_compare()
    del old["runs"][0]["host"]  # saved before runs recorded it: shown as unknown, still valid
    results.validate(old)
    assert report.tables_for(old)[0].rows[0][at + 3 : at + 5] == ["-", "-"]


def _check_report(out, figures: set[str]) -> str:
    assert figures <= {p.name for p in out.iterdir()}
    for name in figures:
        assert (out / name).read_bytes().startswith(PNG)
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(figures)
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from outside"
    results.load(out)  # the saved copy validates
    return page


def test_report_redraws_a_compare_from_saved_json(tmp_path, capsys):
    saved = tmp_path / "run"
    saved.mkdir()
    results.save(fake_compare(), saved / "results.json")
    assert main(["report", str(saved / "results.json"), "--out", str(tmp_path / "redrawn")]) == 0
    printed = capsys.readouterr().out
    assert "dirty-quota" in printed and "writers slowdown %" in printed and "fairness" in printed
    drawn = {"summary.png", "progress.png", "migration.png", "throttle.png", "ms-per-gib.png"}
    page = _check_report(tmp_path / "redrawn", drawn)
    assert "did not converge within 2 s" in page and "<table>" in page
    first = re.search(r'<img alt="([^"]*)"', page)
    assert first and first.group(1).startswith("Summary"), "the summary is the page's first figure"
    assert first.start() < page.index("<h2>Results</h2>"), "...and comes before the tables"
    with Image.open(tmp_path / "redrawn" / "summary.png") as png:
        assert png.width == figures.WIDTH * 150  # 150 dpi
    assert scenario.loads((tmp_path / "redrawn" / "scenario.toml").read_text()) == scenario.load("default")


def test_report_redraws_a_sweep_in_place(tmp_path, capsys):
    results.save(fake_sweep(), tmp_path / "results.json")
    assert main(["report", str(tmp_path)]) == 0
    assert "100Mbit" in capsys.readouterr().out
    _check_report(tmp_path, {"sweep.png"})


def test_report_of_a_bad_file_is_a_clear_error(tmp_path, capsys):
    doc = fake_compare()
    del doc["runs"][0]["policy"]
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path)]) == 2
    assert "runs[0].policy: missing" in capsys.readouterr().err


def test_throttle_figure_puts_each_sleep_where_it_happened():
    from dqmig.experiments.figures import _asleep

    run = fake_run("auto-converge", True)
    m = run["series"]["migration"]
    m["t"] = [0.0, 0.1, 0.2, 0.3]
    m["sleep-ns"] = [[0, 0], [0, 0], [0, 0], [250_000_000, 50_000_000]]  # both woke at 0.3 s
    t, share = _asleep(run)
    assert list(t) == [0.0, 0.1, 0.2, 0.3]
    assert share[:, 0] == pytest.approx([0, 0.5, 1, 1])
    assert share[:, 1] == pytest.approx([0, 0, 0, 0.5])


# -- figures ---------------------------------------------------------------------------------


def _drawn(make, doc):
    """A figure drawn as `figures.draw` draws it (style and layout applied)."""
    with plt.rc_context(figures.STYLE):
        fig = make(doc)
        fig.canvas.draw()
    return fig


def _with_a_short_run() -> dict:
    doc = three_policies()
    series = doc["runs"][2]["series"]  # dirty-quota: over in a third of the time
    for table, keep in ((series["migration"], 8), (series["guest"], 18)):
        for key, column in table.items():
            if isinstance(column, list):
                table[key] = column[:keep]
    series["guest"]["progress-rate"] = [[1500.0, 4800.0]] * keep  # the last row peaks highest
    return doc


TIME_FIGURES = [figures.progress_figure, figures.migration_figure, figures.throttle_figure, figures.ms_per_gib_figure]


@pytest.mark.parametrize("make", TIME_FIGURES, ids=lambda f: f.__name__)
def test_policy_rows_share_one_time_axis_and_the_legend_stays_off_the_data(make):
    fig = _drawn(make, _with_a_short_run())
    assert len({ax.get_xlim() for ax in fig.axes}) == 1, "every row on the same time axis"
    for ax in fig.axes:  # a shared y axis must show every row's data, not the first row's
        low, high = ax.get_ylim()
        assert ax.dataLim.ymax <= high * 1.0001 and (ax.get_yscale() == "log" or ax.dataLim.ymin >= low - 1e-9)
    assert all(ax.get_legend() is None for ax in fig.axes), "no legend inside a panel"
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    assert {"switchover", "dirty sync (iteration)"} <= {t.get_text() for t in legend.get_texts()}
    plt.close(fig)


@pytest.mark.parametrize("make", [figures.summary_figure, *TIME_FIGURES], ids=lambda f: f.__name__)
def test_figure_text_is_readable_and_in_mib(make):
    fig = _drawn(make, three_policies())
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert texts and min(t.get_fontsize() for t in texts) >= 10
    labels = [ax.get_ylabel() for ax in fig.axes] + [t.get_text() for t in texts]
    assert not [x for x in labels if re.search(r"\bMB(/s)?\b", x)], "one unit family: MiB and MiB/s"
    plt.close(fig)


def test_the_summary_puts_every_policy_on_one_axis():
    doc = three_policies()
    fig = _drawn(figures.summary_figure, doc)
    total, downtime, pace = fig.axes[:3]
    assert [t.get_text() for t in total.get_yticklabels()] == ["none", "auto-converge", "dirty-quota"]
    assert total.get_ylim() == downtime.get_ylim() == pace.get_ylim()
    bars = [b.get_width() for b in total.patches]
    assert bars == pytest.approx([2.0, 6.0, 1.8]) and total.patches[0].get_hatch() == "//"  # none gave up
    kept = sorted(round(b.get_width()) for b in pace.patches)
    assert kept == sorted([101, 102, 90, 95, 50, 95])  # writers' and readers' pace kept, %
    plt.close(fig)


def test_many_vcpus_get_one_legend_entry_per_class():
    doc = fake_compare()
    for run in doc["runs"]:
        writer, reader = run["vcpus"]
        run["vcpus"] = [writer] + [{**reader, "name": f"vcpu{i}"} for i in range(1, 12)]
        for table in ("progress-rate", "dirty-rate", "sleep-share", "ms-per-gib"):
            g = run["series"]["guest"]
            g[table] = [row[:1] + row[1:] * 11 for row in g[table]]
        m = run["series"]["migration"]
        m["dirty-limit-sleep-us"] = [None] * len(m["t"])
    fig = _drawn(figures.progress_figure, doc)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:2] == ["vcpu0 (writer, uniform)", "readers (11 vCPUs)"]
    plt.close(fig)
