"""One training task: a copy of the network trained on one train/validation split.

The task owns everything exact resume needs (``state_dict``/``load_state_dict``): weights, optimizer,
best-validation snapshot, counters, the running sums of the current epoch and every RNG. Each
epoch's sample order is derived from (seed, task, epoch) alone, so resuming mid-epoch replays the
same order without drawing from any global RNG.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import models
from .config import Config


@dataclass
class Arrays:
    """Tensors already on the task's device; batches are slices, no DataLoader workers."""

    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, device) -> "Arrays":
        return cls(torch.from_numpy(np.ascontiguousarray(x)).to(device),
                   torch.from_numpy(np.ascontiguousarray(y)).to(device))

    def __len__(self) -> int:
        return len(self.y)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_seed(cfg: Config, task: int) -> int:
    """Shared initialisation starts every task from the same weights (needed before averaging)."""
    return cfg.seed if cfg.model.shared_init else cfg.seed * 1_000_003 + task + 1


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Arrays, batch_size: int, logits_out: bool = False):
    """(mean loss, accuracy[, logits]); loss is inf for a non-finite model, never NaN."""
    model.eval()
    loss_sum, correct, chunks = 0.0, 0, []
    for start in range(0, len(data), batch_size):
        x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        if logits_out:
            chunks.append(out.float().cpu())
    n = max(len(data), 1)
    loss = loss_sum / n
    loss = loss if math.isfinite(loss) else math.inf
    result = (loss, correct / n)
    if logits_out:
        return result + (torch.cat(chunks).numpy() if chunks else np.empty((0, 0), np.float32),)
    return result


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def is_finite_model(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


class Task:
    def __init__(self, cfg: Config, task: int, train: Arrays, val: Arrays, fitness: Arrays,
                 input_shape: tuple, num_classes: int, device):
        self.cfg, self.task, self.device = cfg, task, device
        self.train, self.val, self.fitness = train, val, fitness
        seed_everything(init_seed(cfg, task))
        self.model = models.build(cfg.model, input_shape, num_classes).to(device)
        t = cfg.train
        if t.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum,
                                             weight_decay=t.weight_decay)
        # The RNG streams of training (dropout, augmentation) start from (seed, task) too.
        seed_everything(cfg.seed * 1_000_003 + 7919 * (task + 1))
        self.epoch = 0  # next epoch to run
        self.step = 0  # next step within the epoch
        self.running = np.zeros(3)  # loss sum, correct, samples of the epoch so far
        self.best = snapshot(self.model)
        self.best_score = (-1.0, math.inf, -1)  # (val acc, val loss, epoch)
        self.lineage = [task]  # tasks this model's weights descend from through transfers
        self.best_lineage = [task]
        self.adopted = 0  # transfers this task accepted
        self.last_loss = 0.0  # loss of the latest step: a non-finite one bars the task as a source

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.cfg.train.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, self.task, epoch, 0xDA7A]))
        return torch.from_numpy(rng.permutation(len(self.train))).to(self.device)

    def lr_at(self, epoch: int) -> float:
        lr = self.cfg.train.lr * (self.cfg.train.lr_scale[self.task] if self.cfg.train.lr_scale else 1.0)
        if self.cfg.train.schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * epoch / self.cfg.train.epochs))
        return lr

    def train_steps(self, should_stop) -> bool:
        """Run the rest of the current epoch; False if ``should_stop()`` asked to stop after a step."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.epoch)
        order = self.epoch_order(self.epoch)
        bs = self.cfg.train.batch_size
        self.model.train()
        while self.step < self.steps_per_epoch:
            idx = order[self.step * bs:(self.step + 1) * bs]
            x, y = self.train.x[idx], self.train.y[idx]
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.last_loss = float(loss.detach())
            self.running += (self.last_loss * len(y), int((out.argmax(1) == y).sum()), len(y))
            self.step += 1
            if should_stop():
                return False
        return True

    def finish_epoch(self) -> dict:
        """Close the epoch: its metrics, the best-validation snapshot, counters."""
        loss_sum, correct, n = self.running
        val_loss, val_acc = evaluate(self.model, self.val, self.cfg.train.eval_batch_size)
        score = (val_acc, val_loss, self.epoch)
        if is_finite_model(self.model) and (val_acc, -val_loss) > (self.best_score[0], -self.best_score[1]):
            self.best, self.best_score, self.best_lineage = snapshot(self.model), score, list(self.lineage)
        metrics = {"epoch": self.epoch, "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
                   "val_loss": val_loss, "val_acc": val_acc, "lr": self.lr_at(self.epoch)}
        self.epoch, self.step, self.running = self.epoch + 1, 0, np.zeros(3)
        return metrics

    def fitness_loss(self) -> float:
        return evaluate(self.model, self.fitness, self.cfg.train.eval_batch_size)[0]

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.train.epochs

    # -- exact state -------------------------------------------------------------------------
    def counters(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "running": self.running.tolist(),
                "best_score": list(self.best_score), "lineage": self.lineage,
                "best_lineage": self.best_lineage, "adopted": self.adopted,
                "last_loss": self.last_loss}

    def load_counters(self, c: dict) -> None:
        self.epoch, self.step = int(c["epoch"]), int(c["step"])
        self.running = np.asarray(c["running"], dtype=np.float64)
        self.best_score = tuple(c["best_score"])
        self.lineage, self.best_lineage = list(c["lineage"]), list(c["best_lineage"])
        self.adopted = int(c["adopted"])
        self.last_loss = float(c["last_loss"])

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step
