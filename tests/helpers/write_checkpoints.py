"""Write one checkpoint of a large model, then keep writing newer ones until killed.

Usage: write_checkpoints.py ROOT [background]. Used by test_checkpoint.py to kill -9 a writer
mid-write. ``background``: the newer ones are written by checkpoint.BackgroundWriter's thread
while the main thread trains, as the worker does.
"""

import sys
import time
from pathlib import Path

import numpy as np

from hpc_mto import checkpoint, config
from hpc_mto.samples import Arrays
from hpc_mto.task import Task


def big_task() -> Task:
    cfg = config.load(None, ["model.name=resnet18"])
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32)
    data = Arrays.of(x, np.arange(8) % 2, "cpu")
    return Task(cfg, 0, data, data, data, (3, 8, 8), 2, "cpu")


if __name__ == "__main__":
    root = Path(sys.argv[1])
    background = sys.argv[2:] == ["background"]
    task = big_task()
    checkpoint.save(root, 0, task.global_step, task.state_dict())
    print("first written", flush=True)
    writer = checkpoint.BackgroundWriter()
    while True:
        task.epoch += 1
        if background:
            writer.start(root, 0, task.global_step, task.state_dict())
            while writer.busy:  # the main thread goes on while the thread writes
                time.sleep(0.001)
        else:
            checkpoint.save(root, 0, task.global_step, task.state_dict())
