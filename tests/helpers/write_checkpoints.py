"""Write one checkpoint of a large model, then keep writing newer ones until killed.

Usage: write_checkpoints.py ROOT. Used by test_checkpoint.py to kill -9 a writer mid-write.
"""

import sys
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
    task = big_task()
    checkpoint.save(root, 0, task.global_step, task.state_dict())
    print("first written", flush=True)
    while True:
        task.epoch += 1
        checkpoint.save(root, 0, task.global_step, task.state_dict())
