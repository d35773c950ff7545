"""One training chain of `run --jobs N`, in its own process (see `workers.py`).

`python -m paratransfer.experiment.worker RUN_DIR ARM seed=S`, the recipe, the chain's step
indices and the thread count pickled on stdin by the run that started it.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from paratransfer.experiment.workers import PARENT_ENV, die_with_parent, reply

    parent = os.environ.get(PARENT_ENV)
    if parent is None or len(argv) != 3:
        print("error: started by `paratransfer run --jobs N` only", file=sys.stderr)
        return 2
    die_with_parent(int(parent))
    try:
        recipe, indices, threads = pickle.load(sys.stdin.buffer)
        from paratransfer.experiment.runner import Runner
        from paratransfer.io.console import quiet_libraries
        from paratransfer.io.errors import UserError
        from paratransfer.io.threads import (
            ThreadChoice,
            affinity_cpus,
            apply_threads,
            cgroup_quota_cpus,
        )

        # The run's --threads split between its jobs; OMP_WAIT_POLICY comes with the environment.
        apply_threads(ThreadChoice(threads, "run --threads / --jobs", affinity_cpus(),
                                   cgroup_quota_cpus()))
        quiet_libraries()
        runner = Runner(recipe, Path(argv[0]), progress=False)
        steps, _ = runner.plan()
        try:
            for i in indices:
                runner.execute(i, len(steps), steps[i - 1])
        except UserError as e:
            reply({"error": str(e)})
            return 2
        reply({"ran": runner.ran, "reused": runner.reused})
        return 0
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the run reports it
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
