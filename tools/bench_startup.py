"""Start-up cost of the command line: `clbench --help` and `import strategies` against a bare
interpreter and against `import torch` (what they would cost if they imported it), each the
median of fresh processes, in one run so the ratios hold on a busy machine.

    .venv/bin/python tools/bench_startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": "pass",
    "import strategies": "import strategies",
    "clbench --help": "from clbench.cli import main; main(['--help'])",
    "import torch": "import torch",
    "clbench fit machinery": "import clbench.fit",
}


def seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):  # interleaved: load changes hit every case alike
        for name, code in CASES.items():
            times[name].append(seconds(code))
    torch_s = statistics.median(times["import torch"])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:<24} {median:6.3f} s   {median / torch_s:5.2f}x import torch")


if __name__ == "__main__":
    main()
