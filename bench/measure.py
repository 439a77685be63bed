"""Wall time and peak memory of one whole command: `python -m bench.measure LOG -- CMD ...`.

The figures docs/results.md quotes for pool-size runs: the command runs as a child in its own
session; its stdout goes to LOG with suffix ".out", its stderr to LOG; peak memory is the largest
sum of resident sets over the child and everything it started (the flow, Prefect's temporary
server, Ray's processes and the backbone actors), sampled every second (bench/procmon.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.procmon import run_measured

GIB = 1024**3


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m bench.measure LOG -- COMMAND [ARGS ...]", file=sys.stderr)
        return 2
    log, command = Path(argv[0]), argv[2:]
    measured = run_measured(command, log, timeout=6 * 3600.0, rss_every=1.0, tick_every=0.2)
    minutes, seconds = divmod(measured.wall_seconds, 60)
    print(
        f"exit {measured.returncode}; wall {int(minutes)} min {seconds:04.1f} s"
        f" ({measured.wall_seconds:.1f} s); peak memory of the whole tree"
        f" {measured.peak_rss_bytes / GIB:.2f} GiB; stdout {measured.stdout_path}, stderr {log}"
    )
    return measured.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
