"""The `dqmig` command."""

from __future__ import annotations

import argparse
import json
import math
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dqmig import __version__, dirtyrate, policies, provenance, runtable
from dqmig.display import Progress
from dqmig.experiments import cli as experiments_cli
from dqmig.experiments.cluster import ClusterError
from dqmig.migration.channel import parse_uri
from dqmig.migration.destination import Incoming, IncomingError
from dqmig.migration.local import LocalDestination
from dqmig.migration.params import PARAMS, MigrationParameters, parse_bandwidth, value_of
from dqmig.migration.source import Migration
from dqmig.monitor import IncomingMonitor, Monitor, QmpError
from dqmig.outputs import check_file
from dqmig.programs import PRESETS, guest_programs
from dqmig.qmp import QmpServer
from dqmig.sampler import Sampler
from dqmig.units import MiB, format_size, parse_size
from dqmig.vm import VM, VmConfig

DEFAULT_WRITER_RATE = 16384
INTERRUPTED = 130  # the exit code after Ctrl-C (128 + SIGINT), as shells report it
CANCEL_TIMEOUT_S = 30.0  # a cancelled migration ends as soon as its channels shut down


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _number(kind: type, minimum: float, inclusive: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {'>=' if inclusive else '>'} {minimum}")
        return value

    return parse


def _positive(kind: type):
    return _number(kind, 0, inclusive=False)


def _non_negative(kind: type):
    return _number(kind, 0, inclusive=True)


def _share(text: str) -> float:
    value = _non_negative(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a share from 0 to 1")
    return value


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
    g.add_argument("--page-size", type=_size, default=4096, metavar="SIZE", help="guest page size (default 4K)")
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
    g.add_argument("--dma", metavar="SPEC", help="add a DMA writer device running SPEC, e.g. 'sequential:rate=5000'")
    g.add_argument(
        "--prefill",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="share of memory holding data at boot, 0..1 (a guest that has used its memory: "
        "those pages are sent whole, not as zero pages; default 0)",
    )
    g.add_argument(
        "--dirty-ring",
        type=_non_negative(int),
        default=4096,
        metavar="ENTRIES",
        help="dirty ring entries per vCPU (KVM dirty-ring-size); 0 = dirty bitmap (default 4096)",
    )
    g.add_argument(
        "--pml",
        choices=("on", "off"),
        default="on",
        help="on: the rings reserve Intel PML's 512-entry buffer as KVM on VMX does, so a ring is "
        "soft-full at size - 576 (needs >= 1024 entries); off: size - 64, as without PML (default on)",
    )
    g.add_argument(
        "--writer-rate",
        type=_non_negative(float),
        default=DEFAULT_WRITER_RATE,
        metavar="STEPS",
        help=f"steps/s of the preset's writer programs, 0 = flat out (default {DEFAULT_WRITER_RATE}: "
        "with 8-byte writes, about 64 MiB/s of newly dirtied pages)",
    )
    g.add_argument("--seed", type=_non_negative(int), default=0, help="workload seed (default 0)")


def vm_config(args: argparse.Namespace) -> VmConfig:
    if len(args.program) > args.vcpus:
        raise ValueError(f"{len(args.program)} --program given for {args.vcpus} vCPUs")
    programs, dma = guest_programs(
        args.workload,
        args.vcpus,
        args.memory // args.page_size,
        seed=args.seed,
        writer_rate=args.writer_rate,
        programs=args.program,
        dma=args.dma,
    )
    return VmConfig(
        vcpus=args.vcpus,
        memory=args.memory,
        page_size=args.page_size,
        dirty_ring=args.dirty_ring,
        pml=args.pml == "on",
        programs=programs,
        dma=dma,
        prefill=args.prefill,
    )


def cmd_run(args: argparse.Namespace) -> int:
    if args.json:
        check_file(args.json, "--json")
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
        vm.stop_dirty_log()  # calc-dirty-rate starts its own, as QEMU's does
        rates = _calc_dirty_rates(vm, args.calc_time)
    runtable.print_table(vm, samples)
    runtable.print_dirty_rates(rates, vm.vcpu_classes())
    if args.json:
        report = {
            "config": _config_dict(config),
            "samples": [s.as_dict() for s in samples],
            "calc_dirty_rate": [r.__dict__ for r in rates.values() if not isinstance(r, str)],
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


def _calc_dirty_rates(vm: VM, calc_time: float) -> dict[str, dirtyrate.DirtyRate | str]:
    """Each mode's rate, or the reason QEMU would refuse that mode here."""
    out: dict[str, dirtyrate.DirtyRate | str] = {}
    for mode, measure in dirtyrate.MODES.items():
        try:
            out[mode] = measure(vm, calc_time)
        except dirtyrate.Unavailable as e:
            out[mode] = str(e)
    return out


def _config_dict(c: VmConfig) -> dict:
    return {
        "vcpus": c.vcpus,
        "memory": c.memory,
        "page_size": c.page_size,
        "dirty_ring": c.dirty_ring,
        "pml": c.pml,
        "programs": [p.__dict__ for p in c.programs],
        "dma": c.dma.__dict__ if c.dma else None,
    }


def migration_params(args: argparse.Namespace) -> MigrationParameters:
    p = MigrationParameters()
    p.set("downtime-limit", args.downtime_limit)
    p.set("max-bandwidth", args.max_bandwidth)
    p.set("multifd-channels", args.multifd_channels)
    p.set("x-max-iterations", args.max_iterations)
    p.set("x-max-time", args.max_time)
    p.set_capability("multifd", args.multifd)
    policies.select(p, args.policy)
    for item in args.param:
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE")
        try:
            p.set(name.strip(), value_of(name.strip(), value))
        except ValueError as e:
            raise ValueError(f"--param {item!r}: {e}") from None
    return p


def cmd_migrate(args: argparse.Namespace) -> int:
    check_file(args.report, "--report")
    config = vm_config(args)
    params = migration_params(args)
    params.check_capabilities(config.dirty_ring)
    if args.engine == "sim":
        return _migrate_sim(args, config, params)
    if args.to:
        parse_uri(args.to)  # a bad URI is a usage error, before anything starts
    vm = VM(config)
    monitor = Monitor(vm, params)
    qmp = QmpServer(args.qmp, monitor).start() if args.qmp else None
    dest: LocalDestination | None = None
    dest_report: dict | None = None
    interrupted: str | None = None  # the signal that ended the run
    try:
        with vm, _signals_interrupt() as caught:
            try:
                print(_migrate_banner(args, config, params), flush=True)
                time.sleep(args.warmup)
                if args.to:
                    uri = args.to
                else:
                    dest = LocalDestination.start(args.run_after, args.mem_prealloc)
                    uri = dest.uri
                if args.defer:
                    print(f"waiting for QMP 'migrate' on {args.qmp} (destination {uri})", flush=True)
                    while monitor.migration is None and not monitor.quit_requested.wait(0.1):
                        pass
                else:
                    monitor.migrate({"uri": uri})
                if monitor.migration is not None:
                    migration = _follow_attempts(monitor, serve=qmp is not None, exit_on_complete=args.exit_on_complete)
                    dest_report = dest.finish() if dest and migration.status == "completed" else None
                    if dest and dest.error and migration.status == "completed":
                        print(f"destination failed: {dest.error}", file=sys.stderr)  # else the source said why
            except KeyboardInterrupt:
                interrupted = caught[0] if caught else "SIGINT"
                _cancel(monitor.close_migrations(), f"interrupted ({interrupted})")
        if qmp and (interrupted or monitor.quit_requested.is_set()):
            monitor.shutdown("host-signal" if interrupted else "host-qmp-quit")
    finally:
        if qmp:
            qmp.close()
        if dest:
            dest.kill()
    if monitor.migration is None:
        if monitor.quit_requested.is_set() and not interrupted:
            print("quit: no migration was started")
            return 0
        print("cancelled: interrupted before the migration started")
        return INTERRUPTED
    code = _finish_migrate(args, vm, monitor.migration, dest_report, monitor.attempts[:-1])
    return INTERRUPTED if interrupted and code else code


class _signals_interrupt:  # noqa: N801 (a context manager used as a statement)
    """SIGTERM (and SIGHUP) end the run as Ctrl-C does: KeyboardInterrupt, with the signal's
    name kept in the list `with` gives (QEMU ends on them too: SHUTDOWN, host-signal)."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> list[str]:
        self.caught: list[str] = []
        self.saved = {}
        for sig in self.SIGNALS:
            try:
                self.saved[sig] = signal.signal(sig, self._raise)
            except ValueError:  # not the main thread (a test calling main()): leave them
                pass
        return self.caught

    def _raise(self, signum: int, frame: object) -> None:
        self.caught.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _migrate_sim(args: argparse.Namespace, config: VmConfig, params: MigrationParameters) -> int:
    """`--engine sim`: the same guest and parameters in virtual time over a modelled link."""
    from dqmig.sim.guest import SimVM
    from dqmig.sim.migration import DEFAULT_LINK, SimMigration

    for flag, value in (("--to", args.to), ("--qmp", args.qmp), ("--defer", args.defer)):
        if value:
            raise ValueError(f"{flag} needs the emulator (--engine emu): the simulator has no network or monitor")
    link = args.link or DEFAULT_LINK
    print(_migrate_banner(args, config, params) + f"; engine sim, link {link} B/s", flush=True)
    vm = SimVM(config)
    vm.advance_to(args.warmup)
    m = SimMigration(vm, params, link=link, latency=args.latency / 1000).run()
    return _finish_migrate(args, vm, m, None)  # type: ignore[arg-type]


def _migrate_banner(args: argparse.Namespace, config: VmConfig, params: MigrationParameters) -> str:
    channels = f"multifd {params.multifd_channels} channels" if params.capabilities["multifd"] else "1 channel"
    return (
        f"dqmig migrate: {config.vcpus} vCPUs, {format_size(config.memory)}, workload {args.workload}, "
        f"policy {args.policy}; max-bandwidth {params.max_bandwidth} B/s, "
        f"downtime-limit {params.downtime_limit} ms, {channels}"
    )


def _cancel(migration: Migration | None, reason: str = "interrupted (SIGINT)") -> None:
    """Ctrl-C: migrate_cancel, as QEMU's monitor would, and wait for the migration to end
    (the source VM runs on). Too late once the completion record went out: it completes."""
    if migration is None:
        return
    migration.cancel(reason)
    migration.wait(CANCEL_TIMEOUT_S)


def _follow_attempts(monitor: Monitor, serve: bool, exit_on_complete: bool) -> Migration:
    """Shows each migration attempt's progress. Without QMP (`serve` false) the run ends
    with the migration. With QMP the source stays up as QEMU's does, after a completed
    migration (postmigrate) and after a failed or cancelled one (running, to be retried
    with a new `migrate`), until `quit` (or a signal); with `exit_on_complete` it ends once
    a migration completes. A `quit` during a migration cancels it. Returns the last attempt;
    then no further `migrate` is accepted."""
    shown: Migration | None = None
    while True:
        migration = monitor.migration
        assert migration is not None
        if migration is not shown:
            if shown is not None:
                print(f"\nattempt {len(monitor.attempts) - 1} {_outcome(shown.query())}; following the next")
            _show_progress(migration, monitor.quit_requested)
            if migration.active:  # quit during the migration
                _cancel(migration, "cancelled by quit")
            migration.wait()
            shown = migration
            if serve and not monitor.quit_requested.is_set():
                print(f"\n{_outcome(shown.query())}; QMP stays up until quit", flush=True)
        done = not serve or monitor.quit_requested.is_set() or (exit_on_complete and shown.status == "completed")
        if done and monitor.close_migrations() is shown:
            return shown
        if not done:
            monitor.quit_requested.wait(0.05)


def _outcome(q: dict) -> str:
    return q["status"] if q["status"] == "completed" else f"{q['status']}: {q.get('error-desc', 'unknown reason')}"


def _show_progress(migration: Migration, quit_requested: threading.Event | None = None) -> None:
    progress = Progress(migration)
    try:
        while (migration.active or migration.status == "none") and not (quit_requested and quit_requested.is_set()):
            progress.update()
            time.sleep(0.25)
        progress.update()
    finally:
        progress.close()


def _finish_migrate(
    args: argparse.Namespace, vm: VM, m: Migration, dest_report: dict | None, earlier: Sequence[Migration] = ()
) -> int:
    """The final lines and the report: both describe the last attempt; earlier ones (QMP
    `migrate` retried after a failure) are listed in the report's `attempts`."""
    q = m.query()
    for i, e in enumerate(earlier, 1):
        print(f"attempt {i} of {len(earlier) + 1}: {_outcome(e.query())}")
    ram = q.get("ram", {})
    print(
        f"\nstatus {q['status']}: total {q.get('total-time', 0)} ms, downtime {q.get('downtime', '-')} ms "
        f"(x-blackout-time {q.get('x-blackout-time', '-')} ms), "
        f"setup {q.get('setup-time', 0)} ms, {ram.get('dirty-sync-count', 0)} iterations, "
        f"transferred {format_size(ram.get('transferred', 0))} "
        f"({ram.get('normal', 0)} normal, {ram.get('duplicate', 0)} zero pages)"
    )
    if dest_report:
        print(
            f"destination: digest verified in {dest_report['verify-time-ms']} ms (both sides hashing at once); "
            "guest resumed, progress " + ", ".join(f"{n} +{d}" for n, d in dest_report["progress-after-resume"].items())
        )
    report = {
        "dqmig": __version__,
        "git": provenance.commit_facts(),
        "argv": sys.argv[1:],
        "vm": _config_dict(vm.config),
        "vcpu-classes": vm.vcpu_classes(),
        "migration": m.report(),
        "attempts": [{"attempt": i, **e.query()} for i, e in enumerate(earlier, 1)],
        "destination": dest_report,
        "peak-rss": peak_rss(),
    }
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1)
    print(f"report written to {args.report}")
    if q["status"] == "completed":
        print("completed")
        return 0
    print(_outcome(q))
    return 3 if m.converged is False else 1


def peak_rss() -> int:
    """This process's peak resident memory, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cmd_incoming(args: argparse.Namespace) -> int:
    if args.report:
        check_file(args.report, "--report")
    if args.qmp:
        return _incoming_qmp(args)
    if args.uri == "defer":
        raise ValueError("incoming defer needs --qmp: its 'migrate-incoming' gives the URI")
    incoming = Incoming(args.uri, accept_timeout=args.accept_timeout, mem_prealloc=args.mem_prealloc)
    print(f"dqmig incoming: listening on {incoming.address}", flush=True)
    try:
        result = incoming.run()
    except IncomingError as e:
        print(f"dqmig incoming: failed: {e}", file=sys.stderr)
        return 1
    return _incoming_done(args, result, lambda: time.sleep(args.run_after))


def _incoming_qmp(args: argparse.Namespace) -> int:
    """`dqmig incoming --qmp`: as QEMU's -incoming with a QMP monitor. URI `defer` waits for
    `migrate-incoming`. Once the guest runs here it runs until `quit` or a signal."""
    monitor = IncomingMonitor(accept_timeout=args.accept_timeout, mem_prealloc=args.mem_prealloc)
    server = QmpServer(args.qmp, monitor).start()
    interrupted = False
    try:
        with _signals_interrupt():
            try:
                if args.uri == "defer":
                    monitor.deferred = True
                    print(f"dqmig incoming: waiting for QMP 'migrate-incoming' on {args.qmp}", flush=True)
                    while monitor.incoming is None and not monitor.quit_requested.wait(0.1):
                        pass
                else:
                    monitor.listen(args.uri)
                if monitor.address is not None:
                    print(f"dqmig incoming: listening on {_tcp(monitor.address)}", flush=True)
                    while not monitor.ended.wait(0.1) and not monitor.quit_requested.is_set():
                        pass
            except KeyboardInterrupt:
                interrupted = True
            if monitor.error:
                print(f"dqmig incoming: failed: {monitor.error}", file=sys.stderr)
                return 1
            if monitor.result is None or monitor.result.vm is None:
                if monitor.status in ("none", "setup") and monitor.result is None:
                    print("dqmig incoming: ended before a migration arrived", file=sys.stderr)
                else:  # quit mid-way, as QEMU's quit: the half-received guest is discarded
                    print(
                        f"dqmig incoming: quit during the incoming migration ({monitor.status}): "
                        "the guest is discarded here",
                        file=sys.stderr,
                    )
                return 0 if monitor.quit_requested.is_set() else 1

            def until_quit() -> None:
                nonlocal interrupted
                try:
                    while not interrupted and not monitor.quit_requested.wait(0.1):
                        pass
                except KeyboardInterrupt:
                    interrupted = True

            return _incoming_done(args, monitor.result, until_quit)
    except QmpError as e:
        raise ValueError(e.desc) from None
    finally:
        if interrupted or monitor.quit_requested.is_set():
            monitor.shutdown("host-signal" if interrupted else "host-qmp-quit")
        server.close()


def _tcp(address: tuple[str, int]) -> str:
    host, port = address
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def _incoming_done(args: argparse.Namespace, result: Any, run: Callable[[], None]) -> int:
    """The resumed guest runs for as long as `run` takes; then the report."""
    vm = result.vm
    assert vm is not None
    if result.unconfirmed:
        print(f"dqmig incoming: warning: the guest runs here, but {result.unconfirmed}", file=sys.stderr, flush=True)
    names = vm.writer_names()
    before = [v.progress for v in vm.all_writers]
    t0 = time.monotonic()
    run()
    ran = time.monotonic() - t0
    after = [v.progress for v in vm.all_writers]
    vm.stop()
    report = {
        "handshake": result.handshake,
        "iterations": result.iterations,
        "pages-zero": result.pages_zero,
        "pages-normal": result.pages_normal,
        "bytes": result.bytes,
        "digest": result.digest,
        "verify-time-ms": int(result.verify_time * 1000),
        "digest-time-ms": int(result.digest_time * 1000),
        "source-digest-time-ms": None if result.source_digest_time is None else int(result.source_digest_time * 1000),
        "run-after-s": round(ran, 3),
        "progress-after-resume": {n: a - b for n, a, b in zip(names, after, before, strict=True)},
        "unconfirmed": result.unconfirmed,
        "peak-rss": peak_rss(),
    }
    print(
        f"dqmig incoming: completed: {result.pages_normal} normal and {result.pages_zero} zero pages, "
        f"{result.iterations} iterations, digest verified; guest resumed, progress in "
        f"{ran:.3g} s: " + ", ".join(f"{n} +{d}" for n, d in report["progress-after-resume"].items()),
        flush=True,
    )
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _bandwidth(text: str) -> int:
    try:
        return parse_bandwidth(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_migrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate",
        help="run a VM and live-migrate it",
        description="Run a VM with a workload and live-migrate it with pre-copy over TCP, to a local "
        "destination process (default) or to a running `dqmig incoming` (--to).",
    )
    _add_guest_options(p)
    m = p.add_argument_group("migration (QEMU's parameter names and defaults)")
    m.add_argument("--to", metavar="URI", help="destination tcp:HOST:PORT (default: start one on 127.0.0.1)")
    m.add_argument(
        "--max-bandwidth",
        type=_bandwidth,
        default=PARAMS["max-bandwidth"].default,
        metavar="RATE",
        help="bytes/s, or forms like 1Gbit, 100Mbit, 125M; 0 = unlimited (default 128 MiB/s)",
    )
    m.add_argument(
        "--policy",
        choices=sorted(policies.POLICIES),
        default="none",
        help="throttling policy, as a capability: none (plain pre-copy), auto-converge, dirty-limit "
        "(needs --dirty-ring), dirty-quota (default none)",
    )
    m.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any migration parameter by QEMU's name, e.g. cpu-throttle-increment=20, vcpu-dirty-limit=10, "
        "x-dirty-quota-interval=10, x-dirty-quota-skip-bulk=on (repeatable; see query-migrate-parameters)",
    )
    m.add_argument(
        "--downtime-limit",
        type=_non_negative(int),
        default=PARAMS["downtime-limit"].default,
        metavar="MS",
        help=f"ms (default {PARAMS['downtime-limit'].default})",
    )
    m.add_argument("--multifd", action="store_true", help="capability multifd: parallel page channels")
    m.add_argument(
        "--multifd-channels",
        type=_positive(int),
        default=PARAMS["multifd-channels"].default,
        metavar="N",
        help=f"(default {PARAMS['multifd-channels'].default})",
    )
    m.add_argument(
        "--max-iterations",
        type=_non_negative(int),
        default=0,
        metavar="N",
        help="give up after N iterations (0 = never)",
    )
    m.add_argument(
        "--max-time", type=_non_negative(float), default=0.0, metavar="S", help="give up after S seconds (0 = never)"
    )
    p.add_argument(
        "--warmup", type=_non_negative(float), default=1.0, metavar="S", help="run the guest before migrating (1)"
    )
    p.add_argument(
        "--run-after",
        type=_non_negative(float),
        default=1.0,
        metavar="S",
        help="local destination runs the guest S s (1)",
    )
    p.add_argument("--report", default="dqmig-migration.json", metavar="PATH", help="JSON report path")
    p.add_argument(
        "--engine",
        choices=("emu", "sim"),
        default="emu",
        help="emu: the emulator (vCPU threads, TCP; default); sim: the virtual-time simulator",
    )
    p.add_argument("--link", type=_bandwidth, default=0, metavar="RATE", help="sim: link capacity (default 1Gbit)")
    p.add_argument("--latency", type=_non_negative(float), default=0.0, metavar="MS", help="sim: one-way latency")
    p.add_argument("--mem-prealloc", action="store_true", help="the local destination preallocates its memory")
    p.add_argument("--qmp", metavar="unix:PATH", help="serve a QMP control socket")
    p.add_argument("--defer", action="store_true", help="wait for a QMP 'migrate' command instead of starting")
    p.add_argument(
        "--exit-on-complete",
        action="store_true",
        help="with --qmp: end once a migration completes (else, as QEMU, the source serves QMP after the "
        "migration, postmigrate or running, until 'quit' or a signal; a failed or cancelled migration "
        "can be retried with a new 'migrate')",
    )
    p.set_defaults(func=cmd_migrate)


def _add_incoming_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "incoming",
        help="receive one migration (QEMU's -incoming)",
        description="Wait for one migration on URI, apply it, verify the memory digest, resume the guest "
        "for --run-after seconds, report, exit 0 (non-zero with the reason on failure).",
    )
    p.add_argument(
        "uri",
        metavar="tcp:HOST:PORT",
        help="where to listen (port 0 = any free port); with --qmp, 'defer' waits "
        "for QMP 'migrate-incoming' (QEMU's -incoming defer)",
    )
    p.add_argument(
        "--qmp",
        metavar="unix:PATH",
        help="serve QMP: query-status (inmigrate, then running), query-migrate, events, migrate-incoming; "
        "the resumed guest then runs until 'quit' (not --run-after)",
    )
    p.add_argument("--accept-timeout", type=_positive(float), default=None, metavar="S", help="give up if none arrives")
    p.add_argument("--run-after", type=_non_negative(float), default=1.0, metavar="S", help="run the resumed guest (1)")
    p.add_argument("--report", metavar="PATH", help="write a JSON report")
    p.add_argument(
        "--mem-prealloc",
        action="store_true",
        help="back all guest memory when the migration arrives (QEMU's -mem-prealloc), so pages land in "
        "memory that is already faulted in; the time counts as setup",
    )
    p.set_defaults(func=cmd_incoming)


class _Version(argparse.Action):
    """--version, worked out only when asked for: finding the commit may run git."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and the commit it comes from")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(provenance.version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqmig", description="Live-migration throttling testbed.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a VM and report per-vCPU progress and dirty rates",
        description="Run a VM for T seconds; print per-vCPU progress and dirty "
        "rates and the VM's dirty rate in calc-dirty-rate's three modes.",
    )
    _add_guest_options(run)
    run.add_argument("--seconds", type=_positive(float), default=5.0, metavar="T", help="how long to run (default 5)")
    run.add_argument(
        "--calc-time",
        type=_positive(float),
        default=1.0,
        metavar="S",
        help="calc-dirty-rate measuring time per mode (default 1)",
    )
    run.add_argument("--json", metavar="PATH", help="write the time series and counters as JSON")
    run.set_defaults(func=cmd_run)
    _add_migrate_parser(sub)
    _add_incoming_parser(sub)
    experiments_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ConnectionError, ClusterError) as e:
        print(f"dqmig: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
