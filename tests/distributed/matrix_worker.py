"""Several `clbench fit` runs in one process, one after the other: the GPU-default matrix shares
processes, since start-up (imports, the process group) is most of a tiny run's time.

    python matrix_worker.py SPEC.json        # SPEC: a list of `fit` argument lists

Under `--trainer.devices 2` Lightning starts rank 1 by running this same command again, so both
ranks go through the same list in the same order. Each rank writes SPEC.rank<R>.json: per run name,
"ok" or the traceback of the exception that ended it (the next run still starts)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from clbench.fit import fit


def main(spec: Path) -> None:
    outcome = {}
    for args in json.loads(spec.read_text()):
        name = args[args.index("--run.name") + 1]
        try:
            fit(args)
            outcome[name] = "ok"
        except Exception:
            outcome[name] = traceback.format_exc()
            print(outcome[name], file=sys.stderr, flush=True)
    rank = os.environ.get("LOCAL_RANK", "0")
    spec.with_suffix(f".rank{rank}.json").write_text(json.dumps(outcome, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
