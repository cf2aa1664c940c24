"""torchrun, as `train.launcher: auto` starts it, without its own traceback when the ranks stopped
on a fault the user can fix: each rank's StageError exits RANK_STAGE_ERROR after rank 0 has logged
it in one line (stages/common.py `run_main`), and that line is then all the user reads. Any other
failure (a crash, a signal) keeps torchrun's full report.

    python -m stages.launch --standalone --nproc_per_node=2 -m stages.train
"""

from __future__ import annotations

import logging
import signal
import sys

from stages.common import RANK_STAGE_ERROR


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent's own log lines ("failed (exitcode: 3)", "Sending process ... SIGTERM") would
    # bury the rank's one line; any failure but a StageError is reported whole below.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        # The first rank to stop on a StageError makes the agent stop the others (SIGTERM).
        if RANK_STAGE_ERROR in codes and codes <= {RANK_STAGE_ERROR, -signal.SIGTERM}:
            return RANK_STAGE_ERROR
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
