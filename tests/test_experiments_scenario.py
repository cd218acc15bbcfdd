"""Scenario files: the built-in ones load and round-trip; bad ones get an error naming the
file and the field; overrides (sweeps, --set) are validated like files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dqmig.experiments import scenario, sweep
from dqmig.experiments.scenario import ScenarioError

GOOD = """
name = "tiny"
policies = ["none", "dirty-quota"]
[guest]
vcpus = 2
memory = "16M"
programs = ["uniform:rate=1000", "read-mostly"]
[network]
max-bandwidth = "1Gbit"
[migration]
x-max-time = 5
[policy]
x-dirty-quota-interval = 20
"""


@pytest.mark.parametrize("name", scenario.builtin_names())
def test_builtin_scenarios_load_and_round_trip(name):
    s = scenario.load(name)
    assert s.name == name
    assert scenario.loads(s.to_toml(), "again.toml") == s


REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "python" / "dqmig" / "experiments" / "scenarios"
FILE_REF = re.compile(r"[\w./~-]*\w\.(?:md|toml|json|py|txt|rst|csv)\b")


@pytest.mark.parametrize("name", scenario.builtin_names())
def test_builtin_scenarios_refer_only_to_files_in_the_repository(name):
    text = (BUILTIN / f"{name}.toml").read_text()
    assert scenario.loads(text) == scenario.load(name), "the package's copy is this file"
    for ref in FILE_REF.findall(text):
        assert not ref.startswith(("/", "~", "..")), f"{name}.toml names {ref}, outside the repository"
        assert (REPO / ref).is_file() or (BUILTIN / ref).is_file(), f"{name}.toml names {ref}, not in the repository"


def test_default_scenario_is_the_one_without_a_name():
    assert scenario.load(None).name == "default"


def test_a_good_file_sets_every_section():
    s = scenario.loads(GOOD)
    assert s.guest.memory == 16 << 20 and s.guest.programs == ("uniform:rate=1000", "read-mostly")
    assert s.parameters["max-bandwidth"] == 125_000_000
    p = s.migration_parameters("dirty-quota")
    assert p.x_max_time == 5 and p.x_dirty_quota_interval == 20 and p.capabilities["dirty-quota"]
    config = s.vm_config()
    assert [q.kind for q in config.programs] == ["uniform", "read-mostly"]
    assert config.programs[0].rate == 1000


BAD = [
    ("[guest]\nvcpus = 0", "guest.vcpus: must be >= 1, not 0"),
    ("[guest]\nvcpus = 'two'", "guest.vcpus: must be a whole number"),
    ("[guest]\nvcpu = 2", "guest.vcpu: unknown key (did you mean 'vcpus'?)"),
    ("gust = 1", "gust: unknown key (did you mean 'guest'?)"),
    ("[guest]\nmemory = 'lots'", "guest.memory: bad size"),
    ("[guest]\npage-size = 1000", "guest.page-size: must be a power of two"),
    ("[guest]\nworkload = 'busy'", "guest.workload: unknown preset"),
    ("[guest]\nprograms = ['bogus']", "guest.programs[0]: unknown guest program"),
    ("[guest]\nprograms = ['idle', 'uniform:rate=-1']", "guest.programs[1]: program parameter rate"),
    ("[guest]\nprograms = ['idle', 'idle', 'idle']", "guest.programs: 3 programs for 2 vCPUs"),
    ("[guest]\ndma = 'uniform:speed=3'", "guest.dma: program 'uniform' takes no parameter"),
    ("[guest]\nmemory = 4096\nvcpus = 2", "guest: 1 pages cannot be shared among 2 vCPUs"),
    ("[network]\nmax-bandwidth = 'fast'", "network.max-bandwidth: bad bandwidth"),
    ("[network]\nmultifd = 'yes'", "network.multifd: must be true or false"),
    ("[migration]\ndowntime-limt = 5", "migration.downtime-limt: unknown migration parameter (did you mean"),
    ("[migration]\nx-max-time = -1", "migration.x-max-time: Parameter 'x-max-time' expects a value in"),
    ("[migration.capabilities]\nauto-converge = true", "migration.capabilities.auto-converge: the throttling"),
    ("[migration.capabilities]\nturbo = true", "migration.capabilities.turbo: unknown capability"),
    ("[migration]\nmax-bandwidth = 1\n[network]\nmax-bandwidth = 2", "migration.max-bandwidth: also set in network"),
    ("[policy]\ncpu-throttle-initial = 100", "policy.cpu-throttle-initial: Parameter"),
    ("policies = ['fast']", "policies[0]: unknown policy 'fast'"),
    ("policies = []", "policies: must be a non-empty list"),
    ("[guest]\ndirty-ring = 0", "policy dirty-limit: dirty-limit requires the dirty ring"),
    ("[run]\nbaseline = 0", "run.baseline: must be a finite number >= 0.1"),
    ("guest = 3", "guest: must be a table"),
    ("[guest\nvcpus = 2", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_scenarios_name_the_field(text, message):
    with pytest.raises(ScenarioError) as e:
        scenario.loads(text, "scenario.toml")
    assert str(e.value).startswith("scenario.toml: "), str(e.value)
    assert message in str(e.value)


def test_errors_name_the_file_they_came_from(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[guest]\nvcpus = -3\n")
    with pytest.raises(ScenarioError, match=r"^mine\.toml: guest\.vcpus: must be >= 1"):
        scenario.load(str(path))


def test_an_unknown_scenario_lists_the_built_in_ones():
    with pytest.raises(ScenarioError, match="built-in: .*default"):
        scenario.load("no-such-scenario")


def test_overrides_are_validated_like_files():
    s = scenario.load("default")
    assert s.with_value("guest.vcpus", 4).guest.vcpus == 4
    assert s.with_parameter("x_max_time", 7).parameters["x-max-time"] == 7
    assert s.with_value("network.max-bandwidth", "1Gbit").parameters["max-bandwidth"] == 125_000_000
    with pytest.raises(ScenarioError, match="guest.vcpus: must be >= 1"):
        s.with_value("guest.vcpus", 0)
    with pytest.raises(ScenarioError, match="unknown migration parameter"):
        s.with_parameter("x-warp-speed", 1)
    with pytest.raises(ScenarioError, match="unknown section"):
        s.with_value("gust.vcpus", 1)


def test_command_line_values_read_as_toml_or_text():
    assert scenario.parse_value("4") == 4
    assert scenario.parse_value("1.5") == 1.5
    assert scenario.parse_value("true") is True
    assert scenario.parse_value("32M") == "32M"
    assert scenario.parse_value('["idle", "stress"]') == ["idle", "stress"]


def test_dirty_rate_sweep_sets_the_writers_rate_from_the_bandwidth():
    s = scenario.load("default")  # 32 MiB/s, 4 KiB pages, one writer
    points = sweep.prepare(s, sweep.SWEEPS["dirty-rate"], ["0.5", "2"], ["none"])
    assert [p.guest.writer_rate for p in points] == [4096, 16384]
    with pytest.raises(ScenarioError, match="must be > 0"):
        sweep.prepare(s, sweep.SWEEPS["dirty-rate"], ["0"], ["none"])


def test_dirty_rate_sweep_refuses_explicit_writer_programs():
    s = scenario.loads(GOOD)
    with pytest.raises(ScenarioError, match="needs writers from guest.workload"):
        sweep.prepare(s, sweep.SWEEPS["dirty-rate"], ["1"], ["none"])


def test_skew_sweep_spreads_the_same_total_rate():
    s = scenario.load("default").with_value("guest.vcpus", 4)
    one, two = sweep.prepare(s, sweep.SWEEPS["skew"], ["1", "2"], ["dirty-quota"])
    assert [p.rate for p in one.vm_config().programs] == [16384, 0, 0, 0]
    assert [p.rate for p in two.vm_config().programs] == [8192, 8192, 0, 0]
    with pytest.raises(ScenarioError, match="skew 5"):
        sweep.prepare(s, sweep.SWEEPS["skew"], ["5"], ["none"])


def test_param_sweep_takes_any_parameter_and_checks_its_values():
    on_off = sweep.param_sweep("x-dirty-quota-dma")
    assert [on_off.parse(v) for v in on_off.defaults] == [False, True]
    s = scenario.load("default")
    points = sweep.prepare(s, sweep.param_sweep("cpu-throttle-increment"), ["5", "30"], ["auto-converge"])
    assert [p.parameters["cpu-throttle-increment"] for p in points] == [5, 30]
    with pytest.raises(ScenarioError, match="not a number"):
        sweep.prepare(s, sweep.param_sweep("downtime-limit"), ["soon"], ["none"])
    with pytest.raises(ScenarioError, match="expects a value in"):
        sweep.prepare(s, sweep.param_sweep("downtime-limit"), ["-5"], ["none"])
    with pytest.raises(ScenarioError, match="unknown migration parameter"):
        sweep.param_sweep("warp")


def test_a_sweep_checks_every_point_against_every_policy_before_running():
    s = scenario.load("default")
    with pytest.raises(ScenarioError, match="dirty-limit requires the dirty ring"):
        sweep.prepare(s, sweep.SWEEPS["ring"], ["4096", "0"], ["dirty-limit"])
