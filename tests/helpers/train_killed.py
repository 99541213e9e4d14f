"""stages.train that dies by SIGKILL at optimizer step KILL_AT_STEP: right after the step (and any
checkpoint of it), or, with KILL_IN_CHECKPOINT=1, in the middle of writing that step's checkpoint
(after DeepSpeed's files, before the EMA shards): a real crash, with no cleanup, at a chosen point."""

import os
import signal
import sys

from pipeline.engine import ema
from stages import train


def install_kill(at: int, in_checkpoint: bool) -> None:
    if in_checkpoint:
        _save = ema.ShardedEMA.save

        def _dying_save(self, folder):
            if folder.parent.name == f".tmp-step_{at:08d}":
                os.kill(os.getpid(), signal.SIGKILL)
            _save(self, folder)

        ema.ShardedEMA.save = _dying_save
    else:

        def _die(self, step):
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)

        train.Trainer.on_step_end = _die


if __name__ == "__main__":
    install_kill(int(os.environ["KILL_AT_STEP"]), os.environ.get("KILL_IN_CHECKPOINT") == "1")
    sys.exit(train.cli_main(sys.argv[1:]))
