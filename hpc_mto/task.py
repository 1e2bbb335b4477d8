"""One training task: a copy of the network trained on one train/validation split.

The task owns everything exact resume needs (``state_dict``/``load_state_dict``): weights, optimizer,
best-validation snapshot, counters, the running sums of the current epoch and every RNG. Each
epoch's sample order is derived from (seed, task, epoch) alone, so resuming mid-epoch replays the
same order without drawing from any global RNG.
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from . import models, rng
from .config import Config
from .errors import CheckpointError
from .samples import Samples
from .state import BEST, MODEL, OPT, SWA, TEACHER, State, entry, split_opt


def init_seed(cfg: Config, task: int) -> int:
    """Shared initialisation starts every task from the same weights (needed before averaging)."""
    return cfg.seed if cfg.model.shared_init else cfg.seed * 1_000_003 + task + 1


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Samples, batch_size: int, logits_out: bool = False):
    """(mean loss, accuracy[, logits]); loss is inf for a non-finite model, never NaN."""
    model.eval()
    loss_sum, correct, chunks = 0.0, 0, []
    for x, y in data.batches(batch_size):
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


@torch.no_grad()
def model_logits(model: torch.nn.Module, data: Samples, batch_size: int) -> torch.Tensor:
    """The network's outputs for ``data`` (as stored, in order) in evaluation mode, computed in batches."""
    model.eval()
    return torch.cat([model(x) for x, _ in data.batches(batch_size)])


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(logits/T)), the mean over the batch (Hinton et al., 2015):
    the T² keeps its gradient on the scale of the cross-entropy's whatever the temperature."""
    return temperature ** 2 * F.kl_div(F.log_softmax(logits / temperature, 1),
                                       F.log_softmax(teacher_logits / temperature, 1),
                                       log_target=True, reduction="batchmean")


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, data: Samples, batch_size: int) -> None:
    """BatchNorm statistics for averaged weights, from one pass over ``data`` (the averaged running
    statistics belong to none of the averaged networks). Nothing to do for a network without BN."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    model.train()
    for x, _ in data.batches(batch_size):
        model(x)
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.eval()


def is_finite_model(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


class Task:
    def __init__(self, cfg: Config, index: int, train: Samples, val: Samples, fitness: Samples,
                 input_shape: tuple, num_classes: int, device):
        self.cfg, self.index, self.device = cfg, index, device
        self.train, self.val, self.fitness = train, val, fitness
        rng.seed_everything(init_seed(cfg, index))
        self.model = models.build(cfg.model, input_shape, num_classes).to(device)
        t = cfg.train
        if t.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum,
                                             weight_decay=t.weight_decay)
        # The RNG streams of training (dropout, augmentation) start from (seed, task) too.
        rng.seed_everything(cfg.seed * 1_000_003 + 7919 * (index + 1))
        self.epoch = 0  # next epoch to run
        self.step = 0  # next step within the epoch
        self.running = np.zeros(3)  # loss sum, correct, samples of the epoch so far
        self.best = snapshot(self.model)
        self.best_score = (-1.0, math.inf, -1)  # (val acc, val loss, epoch)
        self.lineage = [index]  # tasks this model's weights descend from through transfers
        self.best_lineage = [index]
        self.trained_on = [index]  # tasks whose training sets these weights have learned from
        self.adopted = 0  # transfers this task accepted
        self.lr_factor = 1.0  # multiplied by transfer.adopt_lr_factor at each adoption
        self.last_loss = 0.0  # loss of the latest step: a non-finite one bars the task as a source
        # distill: the peers' mean logits on each training sample, set at each round, or None
        self.teacher: torch.Tensor | None = None
        self.distill_alpha, self.distill_temperature = cfg.transfer.distill_alpha, cfg.transfer.distill_temperature
        self.swa: dict[str, torch.Tensor] | None = None  # running mean of the weights at epoch ends
        self.swa_count = 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.cfg.train.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        order = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, self.index, epoch, 0xDA7A]))
        return torch.from_numpy(order.permutation(len(self.train))).to(self.device)

    def lr_at(self, epoch: int) -> float:
        lr = self.cfg.train.lr * self.lr_factor
        scale = self.cfg.train.lr_scale
        lr *= scale[self.index] if self.index < len(scale) else 1.0  # the student (index K) has none
        if self.cfg.train.schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * epoch / self.cfg.train.epochs))
        return lr

    def train_steps(self, should_stop) -> bool:
        """Run the rest of the current epoch; False if ``should_stop()`` asked to stop after a step."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.epoch)
        order = self.epoch_order(self.epoch)
        self.model.train()
        key = (self.cfg.seed, self.index, self.epoch)
        for idx, x, y in self.train.training_batches(order, self.cfg.train.batch_size, self.step, key):
            out = self.model(x)
            ce = F.cross_entropy(out, y)
            loss = ce
            if self.teacher is not None:
                alpha = self.distill_alpha
                loss = (1 - alpha) * ce + alpha * distill_loss(out, self.teacher[idx], self.distill_temperature)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.last_loss = float(loss.detach())
            self.running += (float(ce.detach()) * len(y), int((out.argmax(1) == y).sum()), len(y))
            self.step += 1
            if should_stop():
                return False
        return True

    @property
    def has_val(self) -> bool:
        """False with data.val_fraction=0: no validation scores, no best-validation snapshot."""
        return len(self.val) > 0

    def finish_epoch(self) -> dict:
        """Close the epoch: its scores, the best-validation snapshot, the SWA average, counters."""
        loss_sum, correct, n = self.running
        val_loss = val_acc = None
        if self.has_val:
            val_loss, val_acc = evaluate(self.model, self.val, self.cfg.train.eval_batch_size)
            if is_finite_model(self.model) and (val_acc, -val_loss) > (self.best_score[0], -self.best_score[1]):
                self.best, self.best_score = snapshot(self.model), (val_acc, val_loss, self.epoch)
                self.best_lineage = list(self.lineage)
        if self.epoch >= self.cfg.train.epochs - self.cfg.train.swa_epochs:
            self._average_weights()
        scores = {"epoch": self.epoch, "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
                  "val_loss": val_loss, "val_acc": val_acc, "lr": self.lr_at(self.epoch)}
        self.epoch, self.step, self.running = self.epoch + 1, 0, np.zeros(3)
        return scores

    @torch.no_grad()
    def _average_weights(self) -> None:
        """SWA: fold this epoch's weights into the running mean (integer buffers: the latest)."""
        current = snapshot(self.model)
        if self.swa is None:
            self.swa, self.swa_count = current, 1
            return
        self.swa_count += 1
        for name, t in current.items():
            if t.is_floating_point():
                self.swa[name] += (t - self.swa[name]) / self.swa_count
            else:
                self.swa[name] = t

    def fitness_loss(self) -> float:
        return evaluate(self.model, self.fitness, self.cfg.train.eval_batch_size)[0]

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.train.epochs

    # -- exact state -------------------------------------------------------------------------
    def state_dict(self) -> State:
        """Everything a resume needs to continue bit for bit, the global RNGs included."""
        opt = self.optimizer.state_dict()
        names = [n for n, _ in self.model.named_parameters()]
        state = State(meta={"counters": self.counters(), "param_groups": opt["param_groups"],
                            "threads": torch.get_num_threads()})
        for kind, tensors in ((MODEL, self.model.state_dict()), (BEST, self.best), (SWA, self.swa or {})):
            state.arrays.update({entry(kind, n): _numpy(t) for n, t in tensors.items()})
        if self.teacher is not None:
            state.arrays[entry(TEACHER, "logits")] = _numpy(self.teacher)
        for idx, per_param in opt["state"].items():
            state.arrays.update({entry(OPT, names[idx], key): _numpy(t) for key, t in per_param.items()
                                 if isinstance(t, torch.Tensor)})
        rng.capture(state)
        return state

    def load_state_dict(self, state: State) -> None:
        threads = int(state.meta["threads"])
        if threads != torch.get_num_threads():
            raise CheckpointError(f"the checkpoint was written with {threads} torch threads, this process has "
                                  f"{torch.get_num_threads()}: exact resume needs the same (train.threads)")
        self.model.load_state_dict(_tensors(state.of_kind(MODEL)))
        self.best = _tensors(state.of_kind(BEST))
        self.swa = _tensors(state.of_kind(SWA)) or None
        teacher = state.of_kind(TEACHER)
        self.teacher = torch.from_numpy(np.asarray(teacher["logits"])).to(self.device) if teacher else None
        index = {n: i for i, (n, _) in enumerate(self.model.named_parameters())}
        per_param: dict[int, dict] = {}
        for name, array in state.arrays.items():
            if name.startswith(OPT + ":"):
                param, key = split_opt(name)
                per_param.setdefault(index[param], {})[key] = torch.from_numpy(np.asarray(array))
        self.optimizer.load_state_dict({"state": per_param, "param_groups": state.meta["param_groups"]})
        self.load_counters(state.meta["counters"])
        rng.restore(state)

    def counters(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "running": self.running.tolist(),
                "best_score": list(self.best_score), "lineage": self.lineage,
                "best_lineage": self.best_lineage, "trained_on": self.trained_on, "adopted": self.adopted,
                "lr_factor": self.lr_factor, "last_loss": self.last_loss, "swa_count": self.swa_count}

    def load_counters(self, c: dict) -> None:
        self.epoch, self.step = int(c["epoch"]), int(c["step"])
        self.running = np.asarray(c["running"], dtype=np.float64)
        self.best_score = tuple(c["best_score"])
        self.lineage, self.best_lineage = list(c["lineage"]), list(c["best_lineage"])
        self.trained_on = list(c["trained_on"])
        self.adopted = int(c["adopted"])
        self.lr_factor = float(c["lr_factor"])
        self.last_loss = float(c["last_loss"])
        self.swa_count = int(c["swa_count"])

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(np.asarray(a)) for n, a in arrays.items()}
