"""The virtual-time engine at the published scale: wall time per migration, simulated/wall
ratio and peak memory, each policy in a process of its own.

    python benches/sim.py --json            # 512 GiB/32 vCPUs and 1 TiB/256 vCPUs, every policy
    python benches/sim.py --only 512g --policies dirty-quota
    python benches/sim.py --only 1t --policies dirty-quota --max-time 30   # a sample of a slow case

Bars (issue 12): 512 GiB, 32 vCPUs, 7.2 GB/s of dirtying, 640 MB/s link: < 30 s of wall per
policy; 1 TiB, 256 vCPUs: < 60 s; peak RSS < 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = {
    # name: (memory, vcpus, total dirtying bytes/s, link bytes/s, x-max-time in virtual s)
    # Plain pre-copy never converges here: the cap is a few passes of memory over the link
    # (one pass of 1 TiB at 640 MB/s takes 1718 s).
    "512g": ("512G", 32, 7.2e9, 640e6, 3000.0),
    "1t": ("1T", 256, 7.2e9, 640e6, 8000.0),
}
POLICIES = ("none", "auto-converge", "dirty-limit", "dirty-quota")


def one(case: str, policy: str, cap_s: float | None = None) -> dict:
    from dqmig.experiments import scenario
    from dqmig.sim.run import migrate

    memory, vcpus, dirty, link, case_cap = CASES[case]
    rate = dirty / vcpus / 4096  # steps/s: one 8-byte write to a random page of its share each
    s = scenario.parse(
        {
            "name": f"bench-{case}",
            "engine": "sim",
            "guest": {"vcpus": vcpus, "memory": memory, "dirty-ring": 4096, "workload": "uniform", "writer-rate": rate},
            "network": {"max-bandwidth": 0, "link": int(link)},
            "migration": {"x-max-time": cap_s or case_cap},
            "run": {"warmup": 1.0, "baseline": 1.0},
        }
    )
    t0 = time.perf_counter()
    _, m, _, _ = migrate(s, policy)
    wall = time.perf_counter() - t0
    return {
        "case": case,
        "policy": policy,
        "status": m.status,
        "simulated_s": round(m.total_time, 2),
        "wall_s": round(wall, 2),
        "simulated_over_wall": round(m.total_time / wall, 1) if wall else None,
        "iterations": m.dirty_sync_count,
        "transferred_gib": round(m.transferred / 2**30, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--only", choices=sorted(CASES), action="append", help="a case (repeatable; default all)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument(
        "--max-time",
        type=float,
        default=0.0,
        help="x-max-time, virtual s (default: the case's, 3000 for 512g, 8000 for 1t; lower to sample a slow case)",
    )
    ap.add_argument("--one", nargs=2, metavar=("CASE", "POLICY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, cap_s=args.max_time or None)))
        return 0
    rows = []
    for case in args.only or CASES:
        for policy in args.policies.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--one", case, policy, "--max-time", str(args.max_time or 0)],
                capture_output=True,
                text=True,
                check=False,
            )
            row = (
                json.loads(out.stdout)
                if out.returncode == 0
                else {"case": case, "policy": policy, "error": out.stderr[-400:]}
            )
            rows.append(row)
            if not args.json:
                print(row, flush=True)
    if args.json:
        print(json.dumps({"runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
