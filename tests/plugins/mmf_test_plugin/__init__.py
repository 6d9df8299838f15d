"""A test-only MMF plugin, loaded through MMF's own ``env.user_dir`` mechanism.

``test_rank_dump`` is the mmf_multilevel trainer plus two hooks the tests need:
every rank writes its final parameters to ``<save_dir>/rank<R>.pt`` (and the modes a SemVLP model ran,
per update, to ``rank<R>_modes.json``), and
``MMF_TEST_BATCH_SLEEP`` (seconds) slows each training batch so a test can kill a
run in the middle. ``hook_probe`` (``hook_probe.py``) is a tiny method that uses every training hook.
"""
import json
import os
import time

import torch
from mmf.common.registry import registry
from mmf.utils.configuration import get_mmf_env
from mmf.utils.distributed import get_rank

from mmf_multilevel.trainers.multilevel_trainer import MultilevelTrainer


@registry.register_trainer("test_rank_dump")
class RankDumpTrainer(MultilevelTrainer):
    def _forward_pass(self, batch):
        delay = float(os.environ.get("MMF_TEST_BATCH_SLEEP", "0"))
        if delay and self.model.training:
            time.sleep(delay)
        report = super()._forward_pass(batch)
        if self.model.training and "mode" in report:  # SemVLP: the mode this rank ran, per update
            self.__dict__.setdefault("modes_seen", []).append([int(self.num_updates), str(report["mode"])])
        return report

    def train(self):
        super().train()
        model = self.model.module if hasattr(self.model, "module") else self.model
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(get_mmf_env(key="save_dir"), f"rank{get_rank()}.pt"))
        with open(os.path.join(get_mmf_env(key="save_dir"), f"rank{get_rank()}_modes.json"), "w") as f:
            json.dump(self.__dict__.get("modes_seen", []), f)


from . import hook_probe  # noqa: E402,F401
