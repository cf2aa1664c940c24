"""torchrun, as `train.launcher: auto` starts it, without its own report and traceback when the
ranks stopped on a fault the user can fix: each rank that meets a StageError leaves its line in a
folder this launcher names (RANK_ERRORS_ENV) and exits RANK_STAGE_ERROR (stages/common.py
`run_main`); the launcher then says the line once, as the stage would have, and exits
RANK_STAGE_ERROR. Any other failure (a crash, a signal) keeps torchrun's full report.

    python -m stages.launch --standalone --nproc_per_node=2 -m stages.train
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from stages.common import RANK_ERRORS_ENV, RANK_STAGE_ERROR, get_logger


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent's own log lines ("failed (exitcode: 3)", "Sending process ... SIGTERM") would
    # bury the rank's one line; any failure but a StageError is reported whole below.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="newsclf-ranks-") as folder:
        os.environ[RANK_ERRORS_ENV] = folder  # the ranks inherit the environment
        try:
            run(parse_args(argv))
        except ChildFailedError as err:
            codes = {failure.exitcode for failure in err.failures.values()}
            said = sorted(Path(folder).glob("rank*.txt"), key=lambda p: int(p.stem[4:]))
            # The first rank to stop on a StageError makes the agent stop the others (SIGTERM).
            if said and codes <= {RANK_STAGE_ERROR, -signal.SIGTERM}:
                stage, message = said[0].read_text(encoding="utf-8").split("\t", 1)
                get_logger(stage).error("%s", message)
                return RANK_STAGE_ERROR
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
