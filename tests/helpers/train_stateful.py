"""stages.train with a stateful test objective in place of ``dpo``: DPO whose pairs are weighted by
how often their annotator was seen before, ``W = 1 / (1 + 0.1 n_user)``, with ``n_user`` counted in
``observe`` from every rank's ``user_id``s. The loss depends on the state, so a state that is lost,
counted twice or different between ranks changes the run. With KILL_AT_STEP it dies like
``tests.helpers.train_killed``."""

import os
import sys
from collections import Counter

import numpy as np
import torch

from pipeline.losses import objectives
from pipeline.losses.dpo import dpo_loss
from stages import train
from tests.helpers.train_killed import install_kill


class CountingDPO(objectives.DPO):
    batch_fields = ("user_id",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seen: Counter[int] = Counter()

    def __call__(self, errors):
        h, stats = self._pairwise(errors)
        users = errors.fields["user_id"].tolist()
        W = torch.tensor([1.0 / (1.0 + 0.1 * self.seen[u]) for u in users], device=h.device)
        stats["W"] = W
        return objectives.LossOutput(W * dpo_loss(h, self.beta), stats)

    def observe(self, stats):
        assert stats["user_id"].dtype == np.int64
        self.seen.update(int(u) for u in stats["user_id"])

    def state_dict(self):
        users = sorted(self.seen)
        return {
            "user_id": torch.tensor(users, dtype=torch.int64),
            "count": torch.tensor([self.seen[u] for u in users], dtype=torch.int64),
        }

    def load_state_dict(self, state):
        self.seen = Counter(dict(zip(state["user_id"].tolist(), state["count"].tolist())))


objectives.OBJECTIVES["dpo"] = CountingDPO

if __name__ == "__main__":
    if "KILL_AT_STEP" in os.environ:
        install_kill(int(os.environ["KILL_AT_STEP"]), False)
    sys.exit(train.cli_main(sys.argv[1:]))
