"""Startup cost of the ``qvec`` command: wall time and peak memory (RSS) of ``qvec --help`` and ``qvec CMD --help``.

Each command runs in a fresh ``python -m qvec`` process (``PYTHONPATH`` = the source folder measured); its peak RSS
is the child's own ``ru_maxrss`` (``os.wait4``). With ``--compare SRC`` a second source folder (another checkout's
``src``) is measured in the same run, interleaved with this one, so both see the same machine load; the load
averages are printed with the figures. The target is ``qvec --help`` under 1 s.

    python benchmarks/bench_startup.py [--repeats 7] [--compare /path/to/other/checkout/src]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = (["--help"], ["quantize", "--help"], ["grid", "run", "--help"])


def measure(src: Path, args: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one ``python -m qvec ARGS`` run from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("QVEC_PLUGINS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qvec", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"qvec {' '.join(args)} from {src} exited {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compare", type=Path, default=None, help="Another source folder to measure alongside.")
    args = ap.parse_args()
    sources = {"this": SRC, **({"compare": args.compare.resolve()} if args.compare else {})}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    for label, src in sources.items():
        print(f"  {label}: {src}")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for cmd in COMMANDS:
        for src in sources.values():  # a warm-up run each (file cache), not counted
            measure(src, cmd)
        for _ in range(args.repeats):
            for label, src in sources.items():
                results.setdefault((label, " ".join(cmd)), []).append(measure(src, cmd))
    print(f"{'source':8} {'command':20} {'median s':>9} {'min s':>7} {'peak RSS MiB':>13}")
    for (label, cmd), runs in results.items():
        secs = [s for s, _ in runs]
        print(f"{label:8} qvec {cmd:15} {statistics.median(secs):9.2f} {min(secs):7.2f} "
              f"{max(r for _, r in runs):13.0f}")
    if args.compare:
        for cmd in COMMANDS:
            c = " ".join(cmd)
            ratio = statistics.median(s for s, _ in results[("compare", c)]) / statistics.median(
                s for s, _ in results[("this", c)])
            print(f"qvec {c}: compare / this = {ratio:.1f}x the time")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
