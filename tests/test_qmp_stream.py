"""The QMP input stream, fuzzed (hypothesis), and every reply checked against QEMU 10.0's
schema (qapi/migration.json, qapi/run-state.json, qapi/control.json, qapi/machine.json).

Framing follows qobject/json-streamer.c: arbitrary splits of valid input give the same
replies; junk gives errors, and after a reset byte (0xFF, a lexical error: the streamer
drops what it held) the connection answers again."""

from __future__ import annotations

import json
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from dqmig.monitor import Monitor
from dqmig.programs import ProgramSpec
from dqmig.qmp import Session
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig


class Stub:
    """A monitor with two commands: the parser and dispatcher alone."""

    commands = {"echo": None, "query-status": None}

    def execute(self, command: str, args: dict):
        return args if command == "echo" else {"running": True, "status": "running"}


def session() -> Session:
    s = Session(Stub())
    assert s.feed(b'{"execute": "qmp_capabilities"}') == [{"return": {}}]
    return s


INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
json_values = st.recursive(
    st.none() | st.booleans() | INT64 | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
requests = st.lists(
    # ids in int64: beyond it QEMU's parser (qobject/json-parser.c, parse_literal) reads a
    # number as a double, so it is echoed as one, not as the integer sent.
    st.builds(lambda a, i: {"execute": "echo", "arguments": {"v": a}, "id": i}, json_values, INT64),
    min_size=1,
    max_size=4,
)


def encode(reqs: list[dict], style: int) -> bytes:
    if style == 0:  # back to back
        return b"".join(json.dumps(r).encode() for r in reqs)
    if style == 1:  # pretty-printed
        return b"\n".join(json.dumps(r, indent=2).encode() for r in reqs)
    return b"".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode() + b"\r\n" for r in reqs)


@settings(max_examples=150, deadline=None)
@given(requests, st.integers(0, 2), st.lists(st.integers(1, 400), max_size=12))
def test_any_split_of_valid_input_gives_the_same_replies(reqs, style, cuts):
    data = encode(reqs, style)
    whole = session().feed(data)
    assert whole == [{"return": r["arguments"], "id": r["id"]} for r in reqs]
    s, at, got = session(), 0, []
    for cut in [*sorted(set(c % (len(data) + 1) for c in cuts)), len(data)]:
        got += s.feed(data[at:cut])
        at = cut
    assert got == whole


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_junk_gets_errors_and_the_connection_goes_on(junk):
    s = session()
    replies = s.feed(junk)
    assert all(("error" in r or "return" in r) for r in replies)
    assert all(set(r["error"]) == {"class", "desc"} for r in replies if "error" in r)
    after = s.feed(b'\xff{"execute": "query-status", "id": "after"}')
    assert after[-1] == {"return": {"running": True, "status": "running"}, "id": "after"}
    assert all("error" in r and "id" not in r for r in after[:-1]) or after[:-1] == []


def test_stray_bytes_and_recovery_as_qemu():
    s = session()
    assert s.feed(b'\x01{"execute": "query-status"}') == [
        {"error": {"class": "GenericError", "desc": "JSON parse error, stray '\x01'"}},
        {"return": {"running": True, "status": "running"}},
    ]
    # In recovery the lexer skips to a structural character: the tail of a bad token is lost.
    assert s.feed(b'%x {"execute": "query-status"}') == [
        {"error": {"class": "GenericError", "desc": "JSON parse error, stray '%'"}},
        {"return": {"running": True, "status": "running"}},
    ]


# -- the schema (QEMU 10.0) --------------------------------------------------------------------

INT, NUM, STR, BOOL = "int", "number", "str", "bool"
MIGRATION_STATS = {  # MigrationStats: every member mandatory
    "transferred": INT, "remaining": INT, "total": INT, "duplicate": INT, "normal": INT,
    "normal-bytes": INT, "dirty-pages-rate": INT, "mbps": NUM, "dirty-sync-count": INT,
    "postcopy-requests": INT, "page-size": INT, "multifd-bytes": INT, "pages-per-second": INT,
    "precopy-bytes": INT, "downtime-bytes": INT, "postcopy-bytes": INT, "dirty-sync-missed-zero-copy": INT,
}  # fmt: skip
MIGRATION_STATUS = {
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
    "postcopy-recover-setup", "postcopy-recover", "completed", "failed", "colo", "pre-switchover",
    "device", "wait-unplug",
}  # fmt: skip
MIGRATION_INFO = {  # MigrationInfo: every member optional; x-dqmig is dqmig's
    "status": STR, "ram": MIGRATION_STATS, "total-time": INT, "expected-downtime": INT, "downtime": INT,
    "setup-time": INT, "cpu-throttle-percentage": INT, "error-desc": STR,
    "dirty-limit-throttle-time-per-round": INT, "dirty-limit-ring-full-time": INT, "x-dqmig": dict,
}  # fmt: skip
# fill_source_migration_info: which members each status has
EXPECTED_MEMBERS = {
    "setup": {"status"},
    "active": {"status", "setup-time", "total-time", "expected-downtime", "ram", "x-dqmig"},
    "cancelling": {"status", "setup-time", "total-time", "expected-downtime", "ram", "x-dqmig"},
    "completed": {"status", "setup-time", "total-time", "downtime", "ram", "x-dqmig"},
    "cancelled": {"status", "x-dqmig"},  # migrate_cancel sets no error: no error-desc
    "failed": {"status", "error-desc", "x-dqmig"},
}
MIGRATION_PARAMETERS = {  # MigrationParameters (block-bitmap-mapping only once set)
    "announce-initial": INT, "announce-max": INT, "announce-rounds": INT, "announce-step": INT,
    "throttle-trigger-threshold": INT, "cpu-throttle-initial": INT, "cpu-throttle-increment": INT,
    "cpu-throttle-tailslow": BOOL, "tls-creds": STR, "tls-hostname": STR, "tls-authz": STR,
    "max-bandwidth": INT, "avail-switchover-bandwidth": INT, "downtime-limit": INT,
    "x-checkpoint-delay": INT, "multifd-channels": INT, "xbzrle-cache-size": INT,
    "max-postcopy-bandwidth": INT, "max-cpu-throttle": INT, "multifd-compression": STR,
    "multifd-zlib-level": INT, "multifd-qatzip-level": INT, "multifd-zstd-level": INT,
    "x-vcpu-dirty-limit-period": INT, "vcpu-dirty-limit": INT, "mode": STR,
    "zero-page-detection": STR, "direct-io": BOOL,
}  # fmt: skip
MIGRATION_CAPABILITIES = [
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo",
    "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit",
    "mapped-ram",
]  # fmt: skip


def conforms(value, schema, where="") -> None:
    if isinstance(schema, dict):
        assert isinstance(value, dict), where
        for key, v in value.items():
            assert key in schema, f"{where}.{key} is not in QEMU's schema"
            conforms(v, schema[key], f"{where}.{key}")
        return
    kinds = {INT: int, NUM: float, STR: str, BOOL: bool, dict: dict}
    assert isinstance(value, kinds[schema]) and (schema != INT or not isinstance(value, bool)), f"{where}: {value!r}"


def test_replies_follow_qemus_schema(start_destination):
    programs = [ProgramSpec("uniform", region_start=0, region_pages=1024, rate=0, seed=1), ProgramSpec("idle")]
    with VM(VmConfig(vcpus=2, memory=16 * MiB, programs=programs)) as vm:
        s = Session(Monitor(vm))

        def ask(cmd: str, args: dict | None = None):
            return s.handle_line(json.dumps({"execute": cmd, "arguments": args or {}}).encode())["return"]

        ask("qmp_capabilities")
        assert ask("query-migrate") == {}
        params = ask("query-migrate-parameters")
        assert set(MIGRATION_PARAMETERS) <= set(params)
        conforms({k: v for k, v in params.items() if k in MIGRATION_PARAMETERS}, MIGRATION_PARAMETERS)
        names = [c["capability"] for c in ask("query-migrate-capabilities")]
        assert names[: len(MIGRATION_CAPABILITIES)] == MIGRATION_CAPABILITIES and names[-1] == "dirty-quota"
        assert set(ask("query-status")) == {"running", "status"}
        seen: dict[str, dict] = {}

        def watch(until: set[str]) -> None:
            end = time.monotonic() + 20
            while not until & set(seen):
                q = ask("query-migrate")
                seen.setdefault(q["status"], q)
                assert time.monotonic() < end, seen.keys()
                time.sleep(0.005)  # leave the cores to the migration (2 of them in CI)

        # A migration that cannot converge (flat-out writer, 1 ms downtime-limit) and whose bulk
        # pass alone takes seconds (4 MiB of written pages at 1 MiB/s): cancelled, on any host.
        ask("migrate-set-parameters", {"max-bandwidth": 1 * MiB, "downtime-limit": 1})
        with start_destination() as rx:
            ask("migrate", {"uri": rx.uri})
            watch({"active"})
            ask("migrate_cancel")
            watch({"cancelled"})
            rx.join()
        ask("migrate", {"uri": "tcp:127.0.0.1:1"})
        watch({"failed"})
        ask("migrate-set-parameters", {"max-bandwidth": 0, "downtime-limit": 5000})
        with start_destination() as rx:
            ask("migrate", {"uri": rx.uri})
            watch({"completed"})
            rx.join()
    for status, q in seen.items():
        conforms(q, MIGRATION_INFO, status)
        assert q["status"] in MIGRATION_STATUS
        optional = {"cpu-throttle-percentage", "x-dqmig"}  # x-dqmig when dqmig has more to say
        assert set(q) - optional == EXPECTED_MEMBERS[status] - optional, status
        if "ram" in q:
            assert set(q["ram"]) == set(MIGRATION_STATS), status
    assert seen["completed"]["ram"]["remaining"] == seen["completed"]["ram"]["dirty-pages-rate"] == 0
    assert {"active", "cancelled", "completed", "failed"} <= set(seen)
