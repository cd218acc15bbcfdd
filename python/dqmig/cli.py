"""The `dqmig` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from dqmig import dirtyrate
from dqmig.programs import PRESETS, own_regions, parse_program, preset
from dqmig.sampler import Sampler
from dqmig.units import MiB, format_size, parse_size
from dqmig.vm import VM, VmConfig


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def _add_guest_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest")
    g.add_argument("--vcpus", type=_positive(int), default=2, help="vCPUs (default 2)")
    g.add_argument(
        "--memory",
        type=_size,
        default=512 * MiB,
        metavar="SIZE",
        help="guest memory, e.g. 256M, 4G (default 512M)",
    )
    g.add_argument(
        "--page-size", type=_size, default=4096, metavar="SIZE", help="guest page size (default 4K)"
    )
    g.add_argument(
        "--workload",
        choices=PRESETS,
        default="skewed",
        help="workload preset (default skewed: vCPU 0 writes, the rest read-mostly)",
    )
    g.add_argument(
        "--program",
        action="append",
        default=[],
        metavar="SPEC",
        help="per-vCPU program overriding the preset, in vCPU order, e.g. "
        "'uniform:rate=20000', 'read-mostly:write_share=0.05', "
        "'hot-cold:hot_fraction=0.2', 'stress', 'idle' (repeatable)",
    )
    g.add_argument(
        "--dma", metavar="SPEC", help="add a DMA writer device running SPEC, e.g. 'sequential:rate=5000'"
    )
    g.add_argument(
        "--dirty-ring",
        type=int,
        default=4096,
        metavar="ENTRIES",
        help="dirty ring entries per vCPU (KVM dirty-ring-size); 0 = dirty bitmap (default 4096)",
    )
    g.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")


def vm_config(args: argparse.Namespace) -> VmConfig:
    pages = args.memory // args.page_size
    programs = preset(args.workload, args.vcpus, pages, args.seed)
    if len(args.program) > args.vcpus:
        raise ValueError(f"{len(args.program)} --program given for {args.vcpus} vCPUs")
    regions = own_regions(pages, args.vcpus)
    for i, text in enumerate(args.program):
        programs[i] = parse_program(text, region=regions[i], seed=args.seed * 1000 + i)
    dma = parse_program(args.dma, region=(0, 0), seed=args.seed * 1000 + 999) if args.dma else None
    return VmConfig(
        vcpus=args.vcpus,
        memory=args.memory,
        page_size=args.page_size,
        dirty_ring=args.dirty_ring,
        programs=programs,
        dma=dma,
    )


def cmd_run(args: argparse.Namespace) -> int:
    config = vm_config(args)
    vm = VM(config)
    tracking = f"dirty ring {config.dirty_ring}" if config.dirty_ring else "dirty bitmap"
    print(
        f"dqmig run: {config.vcpus} vCPUs, {format_size(config.memory)}, workload "
        f"{args.workload}, {tracking}, {args.seconds:g} s",
        flush=True,
    )
    with vm:
        vm.start_dirty_log()
        sampler = Sampler(vm, clear_log=True).start()
        _wait_with_progress(args.seconds)
        sampler.pause_clearing()
        samples = sampler.stop()
        rates = _calc_dirty_rates(vm, args.calc_time)
    _print_run_table(vm, samples)
    _print_dirty_rates(rates)
    if args.json:
        report = {
            "config": _config_dict(config),
            "samples": [s.as_dict() for s in samples],
            "calc_dirty_rate": [r.__dict__ for r in rates.values() if r is not None],
            "counters": vm.counters(),
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"time series written to {args.json}")
    return 0


def _wait_with_progress(seconds: float) -> None:
    end = time.monotonic() + seconds
    tty = sys.stderr.isatty()
    while (left := end - time.monotonic()) > 0:
        if tty:
            print(f"\r  running... {left:5.1f} s left", end="", file=sys.stderr, flush=True)
        time.sleep(min(0.5, left))
    if tty:
        print("\r" + " " * 30 + "\r", end="", file=sys.stderr)


def _calc_dirty_rates(vm: VM, calc_time: float) -> dict[str, dirtyrate.DirtyRate | None]:
    out: dict[str, dirtyrate.DirtyRate | None] = {}
    for mode, measure in dirtyrate.MODES.items():
        if mode == "dirty-ring" and not vm.guest.dirty_ring:
            out[mode] = None
            continue
        out[mode] = measure(vm, calc_time)
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _print_run_table(vm: VM, samples) -> None:
    page_mb = vm.guest.page_size / MiB
    names = [f"vcpu{i}" for i in range(len(vm.vcpus))] + (["dma"] if vm.dma else [])
    classes = vm.vcpu_classes() + (["device"] if vm.dma else [])
    programs = vm.programs + ([vm.config.dma] if vm.config.dma else [])
    print(
        f"\n{'writer':<7} {'class':<7} {'program':<12} {'progress/s':>12} {'dirty pages/s':>14} "
        f"{'dirty MB/s':>11} {'write MB/s':>11} {'ms/GiB':>8}"
    )
    for i, name in enumerate(names):
        prog = [s.progress_rate[i] for s in samples]
        dirty = [s.dirty_rate[i] for s in samples]
        write = [s.write_rate[i] for s in samples]
        ms = samples[-1].ms_per_gib[i] if samples else 0.0
        print(
            f"{name:<7} {classes[i]:<7} {programs[i].kind:<12} {_mean(prog):>12.0f} "
            f"{_mean(dirty):>14.0f} {_mean(dirty) * page_mb:>11.1f} {_mean(write) / MiB:>11.1f} "
            f"{ms if ms else float('nan'):>8.0f}"
        )
    total = sum(_mean([s.dirty_rate[i] for s in samples]) for i in range(len(names)))
    print(
        f"{'VM':<28} {'':>12} {total:>14.0f} {total * page_mb:>11.1f}"
        f"   ({len(samples)} samples every 100 ms, log cleared at each)"
    )


def _print_dirty_rates(rates: dict[str, dirtyrate.DirtyRate | None]) -> None:
    print("\ncalc-dirty-rate:")
    for mode, r in rates.items():
        if r is None:
            print(f"  {mode:<14} unavailable (dirty ring off: --dirty-ring 0)")
            continue
        extra = ""
        if r.vcpu_dirty_rate:
            extra = "  per vCPU " + ", ".join(f"{x}" for x in r.vcpu_dirty_rate) + " MB/s"
        elif r.sampled_pages:
            extra = f"  ({r.sampled_pages} pages sampled)"
        print(f"  {mode:<14} {r.dirty_rate:>8} MB/s over {r.calc_time:g} s{extra}")


def _config_dict(c: VmConfig) -> dict:
    return {
        "vcpus": c.vcpus,
        "memory": c.memory,
        "page_size": c.page_size,
        "dirty_ring": c.dirty_ring,
        "programs": [p.__dict__ for p in c.programs],
        "dma": c.dma.__dict__ if c.dma else None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqmig", description="Live-migration throttling testbed.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a VM and report per-vCPU progress and dirty rates",
        description="Run a VM for T seconds; print per-vCPU progress and dirty "
        "rates and the VM's dirty rate in calc-dirty-rate's three modes.",
    )
    _add_guest_options(run)
    run.add_argument(
        "--seconds", type=_positive(float), default=5.0, metavar="T", help="how long to run (default 5)"
    )
    run.add_argument(
        "--calc-time",
        type=_positive(float),
        default=1.0,
        metavar="S",
        help="calc-dirty-rate measuring time per mode (default 1)",
    )
    run.add_argument("--json", metavar="PATH", help="write the time series and counters as JSON")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"dqmig: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
