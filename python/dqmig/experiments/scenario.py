"""Scenarios: one guest, one network and one set of migration parameters, read from TOML.

A scenario holds everything a run needs, so a saved result can be rerun from it: the guest
(vCPUs, memory, programs, DMA), the network (max-bandwidth, multifd), migration and policy
parameters by QEMU's names, caps, the seed, and how long to measure the guest before
migrating. Bad files get an error naming the file and the field, e.g.
``scenario.toml: guest.vcpus: must be >= 1, not 0``.

Sweeps and ``--set`` change a scenario through its dict form (`to_dict`, `with_value`) and
parse it again, so an override is validated exactly like a file.
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqmig import policies
from dqmig.migration.params import CAPABILITIES, PARAMS, MigrationParameters, parse_bandwidth, value_of
from dqmig.programs import PRESETS, guest_programs, parse_program
from dqmig.units import MiB, parse_size
from dqmig.vm import VmConfig

DEFAULT_POLICIES = ("none", "auto-converge", "dirty-limit", "dirty-quota")
SCENARIO_DIR = "scenarios"  # inside this package

TOP_KEYS = ("name", "description", "engine", "policies", "guest", "network", "migration", "policy", "run")
ENGINES = ("emu", "sim")  # the emulator (real vCPU threads, TCP) or the virtual-time simulator
GUEST_KEYS = (
    "vcpus",
    "memory",
    "page-size",
    "dirty-ring",
    "pml",
    "workload",
    "writer-rate",
    "programs",
    "dma",
    "prefill",
    "sim-speeds",
)
NETWORK_KEYS = ("max-bandwidth", "multifd", "multifd-channels", "link", "latency")
LINK_KEYS = ("link", "latency")  # the simulator's link model: capacity (bytes/s) and one-way ms
RUN_KEYS = ("seed", "warmup", "baseline", "after")
PARAM_SECTIONS = ("network", "migration", "policy")  # sections holding QEMU parameters


class ScenarioError(ValueError):
    """A scenario that cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class Guest:
    vcpus: int = 2
    memory: int = 64 * MiB
    page_size: int = 4096
    dirty_ring: int = 4096  # entries per vCPU; 0 = dirty bitmap
    pml: bool = True  # the rings reserve Intel PML's buffer, as KVM on VMX
    workload: str = "skewed"  # the preset giving every vCPU a program
    writer_rate: float = 16384  # steps/s of the preset's writers; 0 = flat out
    programs: tuple[str, ...] = ()  # program specs overriding the preset, in vCPU order
    dma: str | None = None  # a DMA writer's program spec
    prefill: float = 0.0  # share of memory written before the guest starts (0: all zero pages)
    sim_speeds: tuple[float, ...] = ()  # simulator only: flat-out steps/s per vCPU (0: the kind's)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    guest: Guest
    parameters: dict[str, Any]  # migration, network and policy parameters set, by QEMU name
    multifd: bool
    policies: tuple[str, ...]
    seed: int
    warmup: float  # s the guest runs before the baseline
    baseline: float  # s of progress measured without migration
    after: float  # s the destination runs the migrated guest
    source: str = field(default="scenario", compare=False)  # where it came from, for messages
    engine: str = "emu"  # which engine runs it: emu (the emulator) or sim (virtual time)
    link: int | None = None  # sim: link capacity in bytes/s (None: 1 Gbit/s)
    latency: float = 0.0  # sim: one-way latency in ms

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout, with every value explicit (defaults filled in)."""
        return canonical(self)

    def with_value(self, field: str, value: Any) -> Scenario:
        """A copy with `field` ('network.max-bandwidth', 'guest.vcpus') set to `value`."""
        data = self.to_dict()
        set_field(data, field, value)
        return parse(data, self.source)

    def with_parameter(self, name: str, value: Any) -> Scenario:
        """A copy with migration parameter `name` (QEMU's name) set, wherever it was."""
        if name.replace("_", "-") not in PARAMS:
            raise ScenarioError(f"unknown migration parameter {name!r}{_suggest(name, PARAMS)}")
        name = name.replace("_", "-")
        data = self.to_dict()
        for section in PARAM_SECTIONS:
            data.get(section, {}).pop(name, None)
        section = "network" if name in NETWORK_KEYS else "migration"
        data.setdefault(section, {})[name] = value
        return parse(data, self.source)

    def vm_config(self, seed: int | None = None) -> VmConfig:
        """The guest, programs seeded from `seed` (the scenario's by default)."""
        return vm_config(self.guest, self.seed if seed is None else seed)

    def migration_parameters(self, policy: str) -> MigrationParameters:
        """QEMU's parameters and capabilities for a run under `policy`, checked."""
        p = MigrationParameters()
        for name, value in self.parameters.items():
            p.set(name, value)
        p.set_capability("multifd", self.multifd)
        policies.select(p, policy)
        p.check_capabilities(self.guest.dirty_ring)
        return p

    def check_policies(self, names: tuple[str, ...] | list[str]) -> None:
        """Raises ScenarioError unless every policy in `names` can run this guest."""
        for name in names:
            try:
                self.migration_parameters(name)
            except ValueError as e:
                raise ScenarioError(f"{self.source}: policy {name}: {e}") from None

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# -- loading ---------------------------------------------------------------------------------


def _builtin_dir() -> Any:
    return importlib.resources.files("dqmig.experiments") / SCENARIO_DIR


def builtin_names() -> list[str]:
    return sorted(f.name.removesuffix(".toml") for f in _builtin_dir().iterdir() if f.name.endswith(".toml"))


def load(name_or_path: str | None = None) -> Scenario:
    """A scenario from a TOML file, or a built-in one by name (default: 'default')."""
    name_or_path = name_or_path or "default"
    path = Path(name_or_path)
    if path.is_file():
        return loads(path.read_text(), path.name)
    if name_or_path in builtin_names():
        text = (_builtin_dir() / f"{name_or_path}.toml").read_text()
        return loads(text, f"{name_or_path}.toml")
    raise ScenarioError(
        f"no scenario file {name_or_path!r} and no built-in scenario of that name; "
        f"built-in: {', '.join(builtin_names())}"
    )


def loads(text: str, source: str = "scenario.toml") -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{source}: not valid TOML: {e}") from None
    return parse(data, source)


def parse(data: dict[str, Any], source: str = "scenario") -> Scenario:
    """A validated Scenario from the TOML layout."""
    return _Parser(data, source).scenario()


# -- parsing ---------------------------------------------------------------------------------


class _Parser:
    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data = data
        self.source = source

    def error(self, field: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{self.source}: {field}: {problem}")

    def table(self, key: str, known: tuple[str, ...] | None) -> dict[str, Any]:
        """Section `key` with keys normalised to QEMU's '-' form; unknown keys are errors."""
        raw = self.data.get(key, {})
        if not isinstance(raw, dict):
            raise self.error(key, f"must be a table ([{key}]), not {_show(raw)}")
        out: dict[str, Any] = {}
        for k, v in raw.items():
            norm = k.replace("_", "-")
            if known is not None and norm not in known:
                raise self.error(f"{key}.{k}", f"unknown key{_suggest(norm, known)}")
            out[norm] = v
        return out

    def scenario(self) -> Scenario:
        for k in self.data:
            if k not in TOP_KEYS:
                raise self.error(k, f"unknown key{_suggest(k, TOP_KEYS)}")
        name = self.string("name", self.data.get("name", "scenario"))
        description = self.string("description", self.data.get("description", ""))
        run = self.table("run", RUN_KEYS)
        guest = self.guest(self.table("guest", GUEST_KEYS))
        parameters, multifd = self.parameters()
        seed = self.integer("run.seed", run.get("seed", 0), 0)
        names = self.policy_names()
        engine = self.string("engine", self.data.get("engine", "emu"))
        if engine not in ENGINES:
            raise self.error("engine", f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        link, latency = self.link()
        scenario = Scenario(
            name=name,
            description=description,
            guest=guest,
            parameters=parameters,
            multifd=multifd,
            policies=names,
            seed=seed,
            warmup=self.number("run.warmup", run.get("warmup", 1.0), 0),
            baseline=self.number("run.baseline", run.get("baseline", 2.0), 0.1),
            after=self.number("run.after", run.get("after", 0.5), 0),
            source=self.source,
            engine=engine,
            link=link,
            latency=latency,
        )
        self.check_guest(scenario)
        scenario.check_policies(names)
        return scenario

    # -- values

    def string(self, field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, not {_show(value)}")
        return value

    def boolean(self, field: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(field, f"must be true or false, not {_show(value)}")
        return value

    def integer(self, field: str, value: Any, lo: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(field, f"must be a whole number, not {_show(value)}")
        if value < lo:
            raise self.error(field, f"must be >= {lo}, not {value}")
        return value

    def number(self, field: str, value: Any, lo: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(field, f"must be a number, not {_show(value)}")
        if not math.isfinite(value) or value < lo:
            raise self.error(field, f"must be a finite number >= {lo:g}, not {value}")
        return float(value)

    def speeds(self, value: Any) -> tuple[float, ...]:
        if not isinstance(value, list):
            raise self.error("guest.sim-speeds", f"must be a list of steps/s per vCPU, not {_show(value)}")
        return tuple(self.number(f"guest.sim-speeds[{i}]", v, 0) for i, v in enumerate(value))

    def fraction(self, field: str, value: Any) -> float:
        share = self.number(field, value, 0)
        if share > 1:
            raise self.error(field, f"must be a share of memory from 0 to 1, not {value}")
        return share

    def size(self, field: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.error(field, f"must be a size such as 64M or 4096, not {_show(value)}")
        try:
            return parse_size(value)
        except ValueError as e:
            raise self.error(field, str(e)) from None

    # -- sections

    def guest(self, g: dict[str, Any]) -> Guest:
        workload = self.string("guest.workload", g.get("workload", Guest.workload))
        if workload not in PRESETS:
            raise self.error("guest.workload", f"unknown preset {workload!r}; choose from {', '.join(PRESETS)}")
        programs = g.get("programs", [])
        if not isinstance(programs, list):
            raise self.error("guest.programs", f"must be a list of program specs, not {_show(programs)}")
        dma = g.get("dma")
        page_size = self.size("guest.page-size", g.get("page-size", Guest.page_size))
        if page_size < 4096 or page_size & (page_size - 1):
            raise self.error("guest.page-size", f"must be a power of two >= 4096, not {page_size}")
        return Guest(
            vcpus=self.integer("guest.vcpus", g.get("vcpus", Guest.vcpus), 1),
            memory=self.size("guest.memory", g.get("memory", Guest.memory)),
            page_size=page_size,
            dirty_ring=self.integer("guest.dirty-ring", g.get("dirty-ring", Guest.dirty_ring), 0),
            pml=self.boolean("guest.pml", g.get("pml", Guest.pml)),
            workload=workload,
            writer_rate=self.number("guest.writer-rate", g.get("writer-rate", Guest.writer_rate), 0),
            programs=tuple(self.string(f"guest.programs[{i}]", p) for i, p in enumerate(programs)),
            dma=None if dma is None else self.string("guest.dma", dma),
            prefill=self.fraction("guest.prefill", g.get("prefill", Guest.prefill)),
            sim_speeds=self.speeds(g.get("sim-speeds", [])),
        )

    def check_guest(self, s: Scenario) -> None:
        """Builds the VM configuration once, so a bad program is reported here."""
        g = s.guest
        if len(g.programs) > g.vcpus:
            raise self.error("guest.programs", f"{len(g.programs)} programs for {g.vcpus} vCPUs")
        pages = g.memory // g.page_size if g.page_size else 0
        for i, text in enumerate(g.programs):
            try:
                parse_program(text, region=(0, max(pages, 1)), seed=0)
            except ValueError as e:
                raise self.error(f"guest.programs[{i}]", str(e)) from None
        if g.dma is not None:
            try:
                parse_program(g.dma, region=(0, 0), seed=0)
            except ValueError as e:
                raise self.error("guest.dma", str(e)) from None
        try:
            s.vm_config().validate()
        except ValueError as e:
            raise self.error("guest", str(e)) from None

    def link(self) -> tuple[int | None, float]:
        """network.link (a bandwidth: '640MB', '10Gbit', bytes/s) and network.latency (ms)."""
        network = self.table("network", NETWORK_KEYS)
        link = network.get("link")
        if link is not None:
            try:
                link = parse_bandwidth(link if isinstance(link, str | int) and not isinstance(link, bool) else "?")
            except ValueError as e:
                raise self.error("network.link", str(e)) from None
            if link <= 0:
                raise self.error("network.link", f"must be > 0 bytes/s, not {link}")
        return link, self.number("network.latency", network.get("latency", 0.0), 0)

    def parameters(self) -> tuple[dict[str, Any], bool]:
        """QEMU parameters from [network], [migration] and [policy]; the multifd capability."""
        network = self.table("network", NETWORK_KEYS)
        for key in LINK_KEYS:
            network.pop(key, None)
        multifd = network.pop("multifd", False)
        if not isinstance(multifd, bool):
            raise self.error("network.multifd", f"must be true or false, not {_show(multifd)}")
        migration = self.table("migration", None)
        caps = migration.pop("capabilities", {})
        multifd = self.capabilities(caps, multifd)
        out: dict[str, Any] = {}
        where: dict[str, str] = {}
        check = MigrationParameters()
        for section, table in (("network", network), ("migration", migration), ("policy", self.table("policy", None))):
            for name, value in table.items():
                field = f"{section}.{name}"
                if name not in PARAMS:
                    raise self.error(field, f"unknown migration parameter{_suggest(name, PARAMS)}")
                if name in where:
                    raise self.error(field, f"also set in {where[name]}")
                value = self.parameter_value(field, name, value)
                try:
                    check.set(name, value)
                except ValueError as e:
                    raise self.error(field, str(e)) from None
                out[name], where[name] = value, field
        return out, multifd

    def parameter_value(self, field: str, name: str, value: Any) -> Any:
        """Bandwidths may be written '32M' or '1Gbit'; booleans also 'on'/'off'."""
        try:
            return value_of(name, value)
        except ValueError as e:
            raise self.error(field, str(e)) from None

    def capabilities(self, caps: Any, multifd: bool) -> bool:
        if not isinstance(caps, dict):
            raise self.error("migration.capabilities", f"must be a table, not {_show(caps)}")
        for name, state in caps.items():
            field = f"migration.capabilities.{name}"
            if name not in CAPABILITIES:
                raise self.error(field, f"unknown capability{_suggest(name, CAPABILITIES)}")
            if name != "multifd":
                raise self.error(field, "the throttling capability is chosen per run by the policy (see `policies`)")
            if not isinstance(state, bool):
                raise self.error(field, f"must be true or false, not {_show(state)}")
            multifd = multifd or state
        return multifd

    def policy_names(self) -> tuple[str, ...]:
        names = self.data.get("policies", list(DEFAULT_POLICIES))
        if not isinstance(names, list) or not names:
            raise self.error("policies", f"must be a non-empty list of policy names, not {_show(names)}")
        for i, n in enumerate(names):
            if n not in policies.POLICIES:
                known = ", ".join(policies.POLICIES)
                raise self.error(f"policies[{i}]", f"unknown policy {_show(n)}; choose from {known}")
        return tuple(names)


def vm_config(g: Guest, seed: int) -> VmConfig:
    """The VM configuration: the preset's programs, then the explicit ones over them."""
    programs, dma = guest_programs(
        g.workload,
        g.vcpus,
        g.memory // g.page_size,
        seed=seed,
        writer_rate=g.writer_rate,
        programs=list(g.programs),
        dma=g.dma,
    )
    return VmConfig(
        vcpus=g.vcpus,
        memory=g.memory,
        page_size=g.page_size,
        dirty_ring=g.dirty_ring,
        pml=g.pml,
        programs=programs,
        dma=dma,
        prefill=g.prefill,
        sim_speeds=g.sim_speeds,
    )


# -- the dict and TOML forms -----------------------------------------------------------------


def canonical(s: Scenario) -> dict[str, Any]:
    g = s.guest
    guest: dict[str, Any] = {
        "vcpus": g.vcpus,
        "memory": g.memory,
        "page-size": g.page_size,
        "dirty-ring": g.dirty_ring,
        "pml": g.pml,
        "workload": g.workload,
        "writer-rate": g.writer_rate,
        "programs": list(g.programs),
    }
    if g.dma is not None:
        guest["dma"] = g.dma
    if g.prefill:
        guest["prefill"] = g.prefill
    if g.sim_speeds:
        guest["sim-speeds"] = list(g.sim_speeds)
    network = {k: v for k, v in s.parameters.items() if k in NETWORK_KEYS}
    network["multifd"] = s.multifd
    if s.link is not None:
        network["link"] = s.link
    if s.latency:
        network["latency"] = s.latency
    migration = {k: v for k, v in s.parameters.items() if k not in NETWORK_KEYS}
    return {
        "name": s.name,
        "description": s.description,
        "engine": s.engine,
        "policies": list(s.policies),
        "run": {"seed": s.seed, "warmup": s.warmup, "baseline": s.baseline, "after": s.after},
        "guest": guest,
        "network": network,
        "migration": migration,
    }


def set_field(data: dict[str, Any], field: str, value: Any) -> None:
    """Sets 'section.key' (or a top-level 'key') in the TOML layout."""
    section, _, key = field.rpartition(".")
    target = data
    if section:
        if section not in TOP_KEYS or section in ("name", "description", "policies"):
            raise ScenarioError(f"{field}: unknown section {section!r}{_suggest(section, TOP_KEYS)}")
        target = data.setdefault(section, {})
    if section in PARAM_SECTIONS:
        for other in PARAM_SECTIONS:  # a parameter lives in one section only
            data.get(other, {}).pop(key.replace("_", "-"), None)
            data.get(other, {}).pop(key, None)
    target[key] = value


def dump_toml(data: dict[str, Any]) -> str:
    """TOML for the scenario layout: top-level values, then one table per section."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it ('4', '1.5', 'true', '[1, 2]'), else the
    text itself ('32M', 'off')."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, dict) else "a table"


def _suggest(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
