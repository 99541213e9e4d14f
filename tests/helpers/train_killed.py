"""stages.train that dies by SIGKILL at optimizer step KILL_AT_STEP: right after the step (and any
checkpoint of it), or, with KILL_IN_CHECKPOINT=1, in the middle of writing that step's checkpoint
(after DeepSpeed's files, before the EMA shards): a real crash, with no cleanup, at a chosen point."""

import os
import signal
import sys

from pipeline.engine import ema
from stages import train

_at = int(os.environ["KILL_AT_STEP"])
_in_ckpt = os.environ.get("KILL_IN_CHECKPOINT") == "1"

if _in_ckpt:
    _save = ema.ShardedEMA.save

    def _dying_save(self, folder):
        if folder.parent.name == f".tmp-step_{_at:08d}":
            os.kill(os.getpid(), signal.SIGKILL)
        _save(self, folder)

    ema.ShardedEMA.save = _dying_save
else:

    def _die(self, step):
        if step == _at:
            os.kill(os.getpid(), signal.SIGKILL)

    train.Trainer.on_step_end = _die

sys.exit(train.cli_main(sys.argv[1:]))
