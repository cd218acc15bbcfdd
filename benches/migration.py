"""Migration throughput and memory, as ratios against baselines taken in the same run.

Every migration here is a real `dqmig migrate` process sending to a `dqmig incoming`
process over loopback TCP, with no bandwidth cap (max-bandwidth 0).

Two raw loopback TCP baselines, both between two processes on 127.0.0.1, with plain
`send`/`recv_into` of 4 MiB at a time and the time from the first byte sent to the
receiver's acknowledgement of the last:

* raw_loopback (the baseline of every ratio): the job the migration does, without the
  migration. The sender sends the guest's size of distinct, non-zero memory (one private
  anonymous mapping, as guest memory is, filled before the clock starts); the receiver
  receives it into as much distinct memory of the same kind, preallocated first
  (MADV_POPULATE_WRITE, as the destination's --mem-prealloc).
* raw_loopback_hot (reported beside it, never a divisor of a headline): the earlier
  baseline, one cache-hot 4 MiB buffer sent over and over and received into one reused
  4 MiB buffer. It measures the kernel's copy loop from and to cache, not a job that moves
  gigabytes of distinct memory (how much faster it runs is
  `raw_loopback_hot_over_raw_loopback`).

Loopback speed on a shared host swings by tens of percent from one second to the next, so
the script takes --rounds interleaved rounds, each: raw_loopback, raw_loopback_hot, the
1-channel migration, the multifd migration, raw_loopback again. A round's baseline is the
mean of its two raw_loopback runs, which bracket its migrations; each round's ratio
divides its own migration by its own baseline, and the headline is the **median of the
rounds' ratios**; best migration over best baseline is printed beside it (`..._best`), and
every round's figures go to stderr as the round finishes, with the host's load average.

* throughput_ratio_1ch: transfer throughput of an idle, non-zero 2 GiB guest, single
  channel, over raw_loopback. Transfer throughput = bytes transferred / (total-time -
  setup-time - verify-time): the time the pages are moving, the stop-and-copy included.
  verify-time is dqmig's own check, not part of a QEMU migration: from the last page to the
  digest comparison, with source and destination hashing at once (both digest times are
  reported beside it). The destination runs with --mem-prealloc (QEMU's -mem-prealloc), so
  its memory is faulted in during setup, as a QEMU destination's is before migration.
* throughput_ratio_multifd: the same with multifd, 2 channels.
* end_to_end_ratio_1ch: bytes transferred / total-time without --mem-prealloc, setup and
  digest verification included, over the median raw_loopback. On a host where first
  touching memory is slow (here about 1 s per GiB) this is bounded by that cost.
* zero_guest_ratio: guest bytes / total-time for an all-zero 2 GiB guest (zero pages go as
  flags; pages the kernel never backed are not even read) over the median raw_loopback.
* src_peak_rss_over_guest, dst_peak_rss_over_guest: peak RSS of the source and destination
  processes over the guest size, for the non-zero guest (with --mem-prealloc).

A `dqmig migrate` that fails stops the script with its exit code and the end of its output.
"""

from __future__ import annotations

import argparse
import json
import mmap
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
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.13 names it
RAW_TIMEOUT_S = 300.0  # a baseline that takes this long is a broken host, not a slow one

# argv: port, total bytes, mode ("distinct" or "hot"). Prints nothing; sends one byte when
# its memory is ready and one when it has received everything.
RECEIVER = """
import mmap, socket, sys
port, total, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
chunk = 4 << 20
if mode == "distinct":
    buf = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # as guest memory, not shmem
    try:
        buf.madvise(int(sys.argv[4]))
    except OSError:
        for i in range(0, total, mmap.PAGESIZE):
            buf[i] = 0
else:
    buf = bytearray(chunk)
view = memoryview(buf)
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"r")
got = 0
while got < total:
    at = got if mode == "distinct" else 0
    n = s.recv_into(view[at : at + min(chunk, total - got)])
    if not n:
        sys.exit("raw loopback receiver: the sender closed early")
    got += n
s.sendall(b"k")
"""


def distinct_memory(size: int) -> mmap.mmap:
    """`size` bytes of anonymous memory, every page backed and non-zero."""
    import numpy as np

    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # as guest memory, not shmem
    np.frombuffer(m, dtype=np.uint8).fill(0x5A)
    return m


def loopback_bytes_per_s(total: int, mode: str, source: mmap.mmap | None = None) -> float:
    """Raw TCP throughput between this process and a receiver process on 127.0.0.1.
    mode "distinct": send `source` (total bytes of distinct memory) into as much
    preallocated memory; "hot": send one 4 MiB buffer over and over into one 4 MiB buffer."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        cmd = [sys.executable, "-c", RECEIVER, str(port), str(total), mode, str(MADV_POPULATE_WRITE)]
        proc = subprocess.Popen(cmd)
        try:
            listener.settimeout(60)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(RAW_TIMEOUT_S)
                if conn.recv(1) != b"r":  # its memory is preallocated
                    raise RuntimeError("raw loopback receiver did not start")
                view = memoryview(source if mode == "distinct" else os.urandom(CHUNK))
                t0 = time.perf_counter()
                sent = 0
                while sent < total:
                    n = min(CHUNK, total - sent)
                    conn.sendall(view[sent : sent + n] if mode == "distinct" else view[:n])
                    sent += n
                if conn.recv(1) != b"k":  # the receiver has everything
                    raise RuntimeError("raw loopback receiver did not finish")
                elapsed = time.perf_counter() - t0
                view.release()
            if proc.wait(60):
                raise RuntimeError(f"raw loopback receiver exited with {proc.returncode}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return total / elapsed


def migrate(memory: str, *extra: str) -> dict:
    """Runs `dqmig migrate` to a local destination; returns its JSON report. The 10 s warm-up
    lets the one-pass stress fill finish first: first-touch page faults here cost 1-4 s per
    GiB depending on the host's load. A failure ends the script with the migrate's output."""
    with tempfile.TemporaryDirectory() as d:
        report = os.path.join(d, "r.json")
        cmd = [sys.executable, "-m", "dqmig", "migrate", "--vcpus", "1", "--memory", memory]
        cmd += ["--max-bandwidth", "0", "--warmup", "10", "--run-after", "0", "--report", report, *extra]
        try:
            p = subprocess.run(cmd, timeout=900, capture_output=True, text=True, check=False)
            failure = None if p.returncode == 0 else f"exit code {p.returncode}"
            out, err = p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            failure = f"no end after {e.timeout:g} s"
            out, err = _text(e.stdout), _text(e.stderr)
        if failure is None and not os.path.exists(report):
            failure = "no report written"
        if failure:
            tail = "\n".join((out + err).strip().splitlines()[-30:])
            print(f"dqmig migrate failed ({failure}): {' '.join(cmd[1:])}\n{tail}", file=sys.stderr)
            sys.exit(f"benchmark stopped: a migration failed ({failure}), load {load()}")
        with open(report) as f:
            return json.load(f)


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


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


def load() -> str:
    """The host's 1, 5 and 15 minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--memory", default="2G", help="guest size (default 2G)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    size = int(args.memory[:-1]) * GiB if args.memory.endswith("G") else int(args.memory)
    pages = size // 4096
    fill = ["--workload", "stress", "--program", f"stress:steps={pages}"]  # one pass: every page non-zero
    mb = lambda x: round(x / 1e6, 1)  # noqa: E731

    load_start = load()
    print(f"load average at start: {load_start}; filling {args.memory} of baseline memory...", file=sys.stderr)
    source = distinct_memory(size)
    raws, brackets, hots, ones, multis, loads = [], [], [], [], [], []
    for r in range(args.rounds):
        before = loopback_bytes_per_s(size, "distinct", source)
        hots.append(loopback_bytes_per_s(size, "hot"))
        ones.append(migrate(args.memory, *fill, "--mem-prealloc"))
        multis.append(migrate(args.memory, *fill, "--mem-prealloc", "--multifd", "--multifd-channels", "2"))
        after = loopback_bytes_per_s(size, "distinct", source)
        brackets.append((before, after))
        raws.append((before + after) / 2)
        loads.append(load())
        one, multi = transfer_throughput(ones[-1]), transfer_throughput(multis[-1])
        print(
            f"round {r + 1}/{args.rounds}: raw_loopback {mb(raws[-1])} MB/s (before {mb(before)}, after {mb(after)}), "
            f"raw_loopback_hot {mb(hots[-1])} MB/s, "
            f"migration 1ch {mb(one)} MB/s (ratio {one / raws[-1]:.3f}, vs hot {one / hots[-1]:.3f}), "
            f"multifd {mb(multi)} MB/s (ratio {multi / raws[-1]:.3f}); load {loads[-1]}",
            file=sys.stderr,
        )
    source.close()
    raw_median = statistics.median(raws)
    print("... without --mem-prealloc...", file=sys.stderr)
    e2e = migrate(args.memory, *fill)
    print("... an all-zero guest...", file=sys.stderr)
    zero = migrate(args.memory, "--workload", "idle")
    zero_result = zero["migration"]["result"]

    one = max(ones, key=transfer_throughput)
    one_result = one["migration"]["result"]
    ratios = [round(transfer_throughput(o) / b, 3) for o, b in zip(ones, raws, strict=True)]
    ratios_hot = [round(transfer_throughput(o) / b, 3) for o, b in zip(ones, hots, strict=True)]
    hot_over_raw = [h / b for h, b in zip(hots, raws, strict=True)]
    ratios_multi = [round(transfer_throughput(o) / b, 3) for o, b in zip(multis, raws, strict=True)]
    out = {
        "throughput_ratio_1ch": round(statistics.median(ratios), 3),
        "throughput_ratio_1ch_best": round(transfer_throughput(one) / max(max(b) for b in brackets), 3),
        "ratios_1ch": ratios,
        "throughput_ratio_1ch_vs_hot": round(statistics.median(ratios_hot), 3),
        "ratios_1ch_vs_hot": ratios_hot,
        "throughput_ratio_multifd": round(statistics.median(ratios_multi), 3),
        "ratios_multifd": ratios_multi,
        "raw_loopback_MBps_rounds": [mb(b) for b in raws],
        "raw_loopback_MBps_before_after": [[mb(b), mb(a)] for b, a in brackets],
        "raw_loopback_hot_MBps_rounds": [mb(b) for b in hots],
        "migration_MBps_1ch_rounds": [mb(transfer_throughput(o)) for o in ones],
        "migration_MBps_multifd_rounds": [mb(transfer_throughput(o)) for o in multis],
        "raw_loopback_hot_over_raw_loopback": round(statistics.median(hot_over_raw), 3),
        "end_to_end_ratio_1ch": round(end_to_end_throughput(e2e) / raw_median, 3),
        "zero_guest_ratio": round(zero_result["ram"]["total"] / (zero_result["total-time"] / 1000) / raw_median, 3),
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
        "load_average": {"start": load_start, "rounds": loads, "end": load()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    out["bars"] = {
        "throughput_ratio_1ch>=0.9": out["throughput_ratio_1ch"] >= 0.9,
        "zero_guest_ratio>=1.5": out["zero_guest_ratio"] >= 1.5,
        "src_peak_rss_over_guest<=1.1": out["src_peak_rss_over_guest"] <= 1.1,
        "dst_peak_rss_over_guest<=1.1": out["dst_peak_rss_over_guest"] <= 1.1,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:36} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
