"""Migration throughput and memory, as ratios against baselines taken in the same run.

Every migration here is a real `dqmig migrate` process sending to a `dqmig incoming`
process over loopback TCP, with no bandwidth cap (max-bandwidth 0).

* throughput_ratio_1ch: transfer throughput of an idle, non-zero 2 GiB guest, single
  channel, over the raw loopback TCP throughput measured by this script between two
  processes (sendall of 4 MiB buffers / recv_into into one reused buffer). Transfer
  throughput = bytes transferred / (total-time - setup-time - verify-time): the time the
  pages are moving, the stop-and-copy included. verify-time is dqmig's own check, not part
  of a QEMU migration: from the last page to the digest comparison, with source and
  destination hashing at once (both digest times are reported beside it). The destination runs with --mem-prealloc
  (QEMU's -mem-prealloc), so its memory is faulted in during setup, as a QEMU destination's
  is before migration. Loopback speed on a shared host swings by +-30 % from one second to
  the next, so the script takes --rounds rounds, each a baseline then the migrations, and
  divides the best migration by the best baseline; `ratios_1ch` lists each round's own,
  `throughput_ratio_1ch_median` their median.
* end_to_end_ratio_1ch: bytes transferred / total-time without --mem-prealloc, setup and
  digest verification included, over the same baseline. On a host where first touching
  memory is slow (here about 1 s per GiB) this is bounded by that cost, not by the stream.
* throughput_ratio_multifd: transfer throughput with multifd, 2 channels, same baseline.
* zero_guest_ratio: guest bytes / total-time for an all-zero 2 GiB guest (zero pages go as
  flags; pages the kernel never backed are not even read) over the same baseline.
* src_peak_rss_over_guest, dst_peak_rss_over_guest: peak RSS of the source and destination
  processes over the guest size, for the non-zero guest (with --mem-prealloc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

GiB = 1 << 30
CHUNK = 4 << 20

RECEIVER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
buf = bytearray(4 << 20); view = memoryview(buf); left = int(sys.argv[2])
while left:
    n = s.recv_into(view, min(len(buf), left))
    if not n: break
    left -= n
s.sendall(b"k")
"""


def loopback_bytes_per_s(total: int) -> float:
    """Raw TCP throughput between two processes on 127.0.0.1."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), str(total)])
        listener.settimeout(30)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            data = os.urandom(CHUNK)
            t0 = time.perf_counter()
            sent = 0
            while sent < total:
                conn.sendall(data[: min(CHUNK, total - sent)])
                sent += min(CHUNK, total - sent)
            conn.recv(1)  # the receiver has everything
            elapsed = time.perf_counter() - t0
        proc.wait(30)
    return total / elapsed


def migrate(memory: str, *extra: str) -> dict:
    """Runs `dqmig migrate` to a local destination; returns its JSON report. The 10 s warm-up
    lets the one-pass stress fill finish first: first-touch page faults here cost 1-4 s per
    GiB depending on the host's load."""
    with tempfile.TemporaryDirectory() as d:
        report = os.path.join(d, "r.json")
        cmd = [sys.executable, "-m", "dqmig", "migrate", "--vcpus", "1", "--memory", memory]
        cmd += ["--max-bandwidth", "0", "--warmup", "10", "--run-after", "0", "--report", report, *extra]
        subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(report) as f:
            return json.load(f)


def transfer_throughput(report: dict) -> float:
    """Bytes transferred over the time pages are moving: total-time minus setup and minus the
    digest verification (both sides hashing once the last page is in). Not QEMU's
    active-phase mbps: with no bandwidth cap, bandwidth x downtime-limit is hundreds of MB,
    so most of an idle guest goes out in the stop-and-copy, which this counts."""
    r = report["migration"]["result"]
    busy_ms = r["total-time"] - r["setup-time"] - report["destination"]["verify-time-ms"]
    return r["ram"]["transferred"] / (busy_ms / 1000)


def end_to_end_throughput(report: dict) -> float:
    r = report["migration"]["result"]
    return r["ram"]["transferred"] / (r["total-time"] / 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--memory", default="2G", help="guest size (default 2G)")
    parser.add_argument("--rounds", type=int, default=3, help="baseline + migration rounds (default 3)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    size = int(args.memory[:-1]) * GiB if args.memory.endswith("G") else int(args.memory)
    pages = size // 4096
    fill = ["--workload", "stress", "--program", f"stress:steps={pages}"]  # one pass: every page non-zero

    raws, ones, multis = [], [], []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: raw loopback baseline...", file=sys.stderr)
        raws.append(loopback_bytes_per_s(size))
        print("... migrating a non-zero guest, 1 channel...", file=sys.stderr)
        ones.append(migrate(args.memory, *fill, "--mem-prealloc"))
        print("... with multifd, 2 channels...", file=sys.stderr)
        multis.append(migrate(args.memory, *fill, "--mem-prealloc", "--multifd", "--multifd-channels", "2"))
    raw = max(raws)
    one = max(ones, key=transfer_throughput)
    multi = max(multis, key=transfer_throughput)
    print("... without --mem-prealloc...", file=sys.stderr)
    e2e = migrate(args.memory, *fill)
    print("... an all-zero guest...", file=sys.stderr)
    zero = migrate(args.memory, "--workload", "idle")
    zero_result = zero["migration"]["result"]

    one_result = one["migration"]["result"]
    ratios = [round(transfer_throughput(o) / b, 3) for o, b in zip(ones, raws, strict=True)]
    out = {
        "raw_loopback_MBps": round(raw / 1e6, 1),
        "migration_MBps_1ch": round(transfer_throughput(one) / 1e6, 1),
        "migration_MBps_multifd": round(transfer_throughput(multi) / 1e6, 1),
        "throughput_ratio_1ch": round(transfer_throughput(one) / raw, 3),
        "ratios_1ch": ratios,
        "throughput_ratio_1ch_median": round(statistics.median(ratios), 3),
        "raw_loopback_MBps_rounds": [round(b / 1e6, 1) for b in raws],
        "migration_MBps_1ch_rounds": [round(transfer_throughput(o) / 1e6, 1) for o in ones],
        "end_to_end_ratio_1ch": round(end_to_end_throughput(e2e) / raw, 3),
        "throughput_ratio_multifd": round(transfer_throughput(multi) / raw, 3),
        "zero_guest_ratio": round(zero_result["ram"]["total"] / (zero_result["total-time"] / 1000) / raw, 3),
        "src_peak_rss_over_guest": round(one["peak-rss"] / size, 3),
        "dst_peak_rss_over_guest": round(one["destination"]["peak-rss"] / size, 3),
        "total_time_ms_1ch": one_result["total-time"],
        "setup_time_ms_1ch": one_result["setup-time"],
        "downtime_ms_1ch": one_result["downtime"],
        "verify_time_ms_1ch": one["destination"]["verify-time-ms"],
        "source_digest_ms_1ch": one["destination"]["source-digest-time-ms"],
        "destination_digest_ms_1ch": one["destination"]["digest-time-ms"],
        "total_time_ms_1ch_no_prealloc": e2e["migration"]["result"]["total-time"],
        "guest_bytes": size,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    out["bars"] = {
        "throughput_ratio_1ch>=0.75": out["throughput_ratio_1ch"] >= 0.75,
        "zero_guest_ratio>=1.5": out["zero_guest_ratio"] >= 1.5,
        "src_peak_rss_over_guest<=1.1": out["src_peak_rss_over_guest"] <= 1.1,
        "dst_peak_rss_over_guest<=1.1": out["dst_peak_rss_over_guest"] <= 1.1,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
