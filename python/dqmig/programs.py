"""Guest programs (what each vCPU runs) and the workload presets built from them."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("idle", "sequential", "uniform", "hot-cold", "read-mostly", "stress")
PRESETS = ("idle", "uniform", "skewed", "stress", "hot-cold", "sequential")

# Parameters each kind takes beyond the common ones, with defaults.
_KIND_PARAMS: dict[str, dict[str, float]] = {
    "hot-cold": {"hot_fraction": 0.1, "hot_probability": 0.9},
    "read-mostly": {"write_share": 0.0001, "compute": 256},
}
_COMMON = ("region_start", "region_pages", "write_size", "rate", "seed", "steps")


@dataclass
class ProgramSpec:
    """One guest program. Pages are guest page numbers; `rate` is steps/s (0 = flat out)."""

    kind: str = "idle"
    region_start: int = 0
    region_pages: int = 0  # 0 = to the end of memory
    write_size: int = 8
    rate: float = 0.0
    seed: int = 0
    steps: int = 0  # 0 = forever
    params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _COMMON:
            _check_number(name, getattr(self, name), integer=name != "rate")
        for name, value in self.params.items():
            _check_number(name, value, integer=name == "compute")
        if self.kind not in KINDS:
            raise ValueError(f"unknown guest program {self.kind!r}; choose from {', '.join(KINDS)}")
        known = _KIND_PARAMS.get(self.kind, {})
        unknown = set(self.params) - set(known)
        if unknown:
            raise ValueError(f"program {self.kind!r} takes no parameter {sorted(unknown)[0]!r}")
        self.params = {**known, **self.params}

    @classmethod
    def from_native(cls, spec: dict[str, Any]) -> ProgramSpec:
        """The inverse of to_json: a spec as the native Vcpu exports it (kind, the common
        fields, the kind's parameters flat beside them)."""
        params = {k: v for k, v in spec.items() if k not in _COMMON and k != "kind"}
        return cls(kind=spec["kind"], **{k: spec[k] for k in _COMMON if k in spec}, params=params)

    def to_json(self) -> str:
        """The form the native Vcpu takes."""
        d: dict[str, Any] = {k: v for k, v in asdict(self).items() if k != "params"}
        d.update(self.params)
        if self.kind == "read-mostly":
            d["compute"] = int(d["compute"])
        return json.dumps(d)


def parse_program(text: str, *, region: tuple[int, int], seed: int) -> ProgramSpec:
    """'uniform', 'read-mostly:write_share=0.05,compute=200', 'uniform:rate=5000,region=shared'.

    `region` is (start, pages) of the vCPU's own share, used unless `region=shared` (all
    memory) or explicit region_start/region_pages are given.
    """
    kind, _, rest = text.partition(":")
    kwargs: dict[str, Any] = {"region_start": region[0], "region_pages": region[1], "seed": seed}
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"bad program parameter {item!r} in {text!r}: expected key=value")
        if key == "region":
            if value != "shared":
                raise ValueError(f"region must be 'shared' (or give region_start/region_pages), not {value!r}")
            kwargs["region_start"], kwargs["region_pages"] = 0, 0
        elif key == "write":
            kwargs["write_size"] = _number(value, key, int)
        elif key in _COMMON:
            kwargs[key] = _number(value, key, float if key == "rate" else int)
        else:
            params[key] = _number(value, key, float)
    return ProgramSpec(kind=kind.strip(), params=params, **kwargs)


def _number(value: str, key: str, kind: type) -> Any:
    try:
        number = float(value) if kind is float else int(value)
    except ValueError:
        raise ValueError(
            f"program parameter {key}={value!r} is not a {'number' if kind is float else 'whole number'}"
        ) from None
    _check_number(key, number, integer=kind is int)
    return number


def _check_number(name: str, value: Any, *, integer: bool) -> None:
    """Program numbers are finite and non-negative; counts and sizes are whole."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"program parameter {name}={value!r} is not a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"program parameter {name}={value!r} must be a finite number >= 0")
    if integer and value != int(value):
        raise ValueError(f"program parameter {name}={value!r} must be a whole number")
    if integer and value >= 1 << 64:
        raise ValueError(f"program parameter {name}={value!r} is too large")


def own_regions(pages: int, vcpus: int) -> list[tuple[int, int]]:
    """Disjoint, equal shares of memory, one per vCPU (the last takes the remainder)."""
    share = pages // vcpus
    if share == 0:
        raise ValueError(f"{pages} pages cannot be shared among {vcpus} vCPUs")
    return [(i * share, share if i < vcpus - 1 else pages - i * share) for i in range(vcpus)]


def preset(name: str, vcpus: int, pages: int, seed: int = 0, writer_rate: float = 0.0) -> list[ProgramSpec]:
    """Per-vCPU programs for a workload preset; each vCPU works in its own region.

    idle: every vCPU halts.  uniform: every vCPU writes random pages.
    skewed: vCPU 0 writes random pages, the others are read-mostly (compute, 0.01 % writes).
    stress: guestperf's stress on every vCPU, flat out.  hot-cold: 90 % of writes to 10 %
    of pages.  sequential: every vCPU writes its pages in order.
    Writers (all but stress and read-mostly) run at `writer_rate` steps/s, 0 = flat out.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(PRESETS)}")
    regions = own_regions(pages, vcpus)

    def spec(i: int, text: str) -> ProgramSpec:
        p = parse_program(text, region=regions[i], seed=vcpu_seed(seed, i))
        if p.kind in ("uniform", "hot-cold", "sequential"):
            p.rate = writer_rate
        return p

    if name == "skewed":
        return [spec(i, "uniform" if i == 0 else "read-mostly") for i in range(vcpus)]
    return [spec(i, name) for i in range(vcpus)]


def vcpu_seed(seed: int, i: int) -> int:
    """Each vCPU's program seed from the workload seed (i = DMA_SEED for the DMA writer)."""
    return seed * 1000 + i


DMA_SEED = 999


def guest_programs(
    workload: str,
    vcpus: int,
    pages: int,
    *,
    seed: int,
    writer_rate: float,
    programs: list[str],
    dma: str | None,
) -> tuple[list[ProgramSpec], ProgramSpec | None]:
    """The preset's programs with explicit per-vCPU program specs over the first ones, and
    the DMA writer's program (None without one)."""
    if len(programs) > vcpus:
        raise ValueError(f"{len(programs)} programs given for {vcpus} vCPUs")
    specs = preset(workload, vcpus, pages, seed, writer_rate)
    regions = own_regions(pages, vcpus)
    for i, text in enumerate(programs):
        specs[i] = parse_program(text, region=regions[i], seed=vcpu_seed(seed, i))
    dma_spec = parse_program(dma, region=(0, 0), seed=vcpu_seed(seed, DMA_SEED)) if dma else None
    return specs, dma_spec


def classify(spec: ProgramSpec) -> str:
    """The vCPU class experiments group by: writer, reader or idle."""
    if spec.kind == "idle":
        return "idle"
    if spec.kind == "read-mostly" and spec.params.get("write_share", 0) < 0.5:
        return "reader"
    return "writer"
