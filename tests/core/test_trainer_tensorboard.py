"""The trainer closes MMF's tensorboard writer itself, on success and on error: left to the logger's
``__del__`` at interpreter exit, the close waits for a daemon writer thread that no longer runs and the
process hangs (``mmf_run ... training.tensorboard=True`` never returned)."""
import glob
import os
import subprocess
import sys

import mmf  # noqa: F401
import pytest
from mmf.utils.logger import TensorboardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmf_multilevel.trainers.multilevel_trainer import MultilevelTrainer

EXIT_SCRIPT = """
import sys
import mmf
from mmf.utils.logger import TensorboardLogger
from mmf_multilevel.trainers.multilevel_trainer import MultilevelTrainer

logger = TensorboardLogger(sys.argv[1])  # a module global, finalised at exit as in mmf_run
trainer = MultilevelTrainer.__new__(MultilevelTrainer)
trainer.tb_writer = logger
for step in range(300):
    logger.add_scalars({"train/lr": 0.1, "val/accuracy": 0.5}, step)
trainer.close_tensorboard()
print("done")
"""


def stub_trainer(log_dir, train):
    trainer = MultilevelTrainer.__new__(MultilevelTrainer)
    trainer.tb_writer = TensorboardLogger(str(log_dir))
    trainer._train = train
    return trainer


def scalars(log_dir):
    (events,) = glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents*"), recursive=True)
    acc = EventAccumulator(os.path.dirname(events))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("fails", [False, True])
def test_train_closes_the_writer_and_every_scalar_is_on_disk(tmp_path, fails):
    def train():
        for step in range(5):
            trainer.tb_writer.add_scalars({"train/lr": 0.1 * step}, step)
        if fails:
            raise RuntimeError("boom")

    trainer = stub_trainer(tmp_path, train)
    if fails:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.train()
    else:
        trainer.train()
    assert trainer.tb_writer.summary_writer is None  # nothing left for __del__ at exit
    assert scalars(tmp_path) == {"train/lr": [0, 1, 2, 3, 4]}
    trainer.close_tensorboard()  # twice is harmless


def test_a_process_that_wrote_scalars_exits(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0 and result.stdout.split()[-1] == "done", result.stderr[-2000:]
    assert scalars(tmp_path)["val/accuracy"] == list(range(300))
