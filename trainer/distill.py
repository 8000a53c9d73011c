"""Knowledge distillation: one student trained on a teacher's soft labels (`trainer distill`).

The teacher is an exported model or ensemble run by onnxruntime (trainer/teacher.py). Its
probabilities for the training split are computed once, before the first epoch, and
cached beside the run dirs, so --resume (and another student of the same teacher) reads
them back instead of running the teacher again. The student minimizes the usual KD loss

    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(hard labels, recipe's label smoothing)

where x_T is a distribution softened at temperature T; T^2 keeps the soft term's
gradients on the scale of the hard term's as T changes (Hinton et al., 2015).

Two approximations, both common practice (docs/distillation.md):
- The teacher gives probabilities, not logits, so its distribution at temperature T is
  p^(1/T), renormalized (= softmax(log p / T)). For one model that is exactly
  softmax(z / T) of its logits z (log p = z - logsumexp z); for an averaging ensemble it
  softens the ensemble's mean distribution, which is not the mean of the members'
  softened ones. Probabilities that underflowed to 0 in float32 are read as the
  smallest normal float32, ~1e-38.
- The teacher sees each clean training image once; the student sees it augmented
  (flips, small translations) and is taught the clean image's label. Those
  augmentations barely move a good teacher's output, so one precomputed pass stands
  in for running the teacher on every augmented batch, at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ensemble_serving.datasets import Dataset
from trainer.data import split_train_validation
from trainer.errors import TrainerError
from trainer.objective import CrossEntropy
from trainer.recipes import DEFAULT_ALPHA, DEFAULT_TEMPERATURE
from trainer.teacher import Teacher, fingerprint, read_cache, teacher_probabilities, write_cache

CACHE_FORMAT = 1


__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_TEMPERATURE",
    "KnowledgeDistillation",
    "check_settings",
    "kd_loss",
    "soften",
    "teacher_targets",
]


def check_settings(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise TrainerError(f"--temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise TrainerError(f"--alpha must be in [0, 1], got {alpha}")


def soften(probabilities: np.ndarray, temperature: float) -> torch.Tensor:
    """log of the teacher's distribution at temperature T: log_softmax(log p / T) (= log of p^(1/T), renormalized)."""
    p = torch.from_numpy(np.asarray(probabilities)).double()
    log_p = torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.log_softmax(log_p / temperature, dim=1).float()


def kd_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), the batch mean; teacher_log_probs already softened (soften())."""
    student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(student, teacher_log_probs, reduction="batchmean", log_target=True) * temperature**2


class KnowledgeDistillation(CrossEntropy):
    """The objective of a student (the interface: trainer/objective.py)."""

    part_names = ("kd_loss", "ce_loss")

    def __init__(self, teacher_probs: np.ndarray, temperature: float, alpha: float, record: dict):
        """teacher_probs: [N, classes], the training split in its order; record: config.json's word on the teacher."""
        check_settings(temperature, alpha)
        self.teacher_probs, self.temperature, self.alpha, self.record = teacher_probs, temperature, alpha, record

    @property
    def identity(self) -> dict:
        return {
            "teacher_sha256": self.record["teacher"]["sha256"],
            "temperature": self.temperature,
            "alpha": self.alpha,
        }

    def prepare(self, hyper: dict, data, device: torch.device) -> tuple[torch.Tensor, ...]:
        super().prepare(hyper, data, device)
        if len(self.teacher_probs) != len(data.train_labels):
            raise TrainerError(f"the teacher's probabilities cover {len(self.teacher_probs)} images, the training "
                               f"split has {len(data.train_labels)}")  # fmt: skip
        return (soften(self.teacher_probs, self.temperature).to(device),)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, *targets: torch.Tensor):
        (teacher_log_probs,) = targets
        soft = kd_loss(logits, teacher_log_probs, self.temperature)
        hard = self.criterion(logits, labels)
        return self.alpha * soft + (1 - self.alpha) * hard, torch.stack([soft, hard]).detach()

    def config_entries(self) -> dict:
        return {"distillation": {**self.record, "temperature": self.temperature, "alpha": self.alpha,
                                 "loss": "alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * "
                                         "CE(hard labels, hyperparameters.label_smoothing)",
                                 "soft_labels": "teacher probabilities of the unaugmented training images, "
                                                "softened as p^(1/T) renormalized"}}  # fmt: skip


# --------------------------------------------------------------------------- the teacher's targets


@dataclass
class TeacherTargets:
    train: np.ndarray  # probabilities [N_train, classes], in the order of the training split
    val: np.ndarray  # the same for the validation split (empty without one)
    cache: Path
    from_cache: bool

    def record(self, teacher: Teacher, train: Dataset, val_fraction: float, split_seed: int) -> dict:
        """config.json's distillation entry: the teacher, its cache and its accuracy on the splits."""
        train_idx, val_idx = split_train_validation(train.labels, val_fraction, split_seed)
        accuracy = lambda probs, idx: float((probs.argmax(1) == train.labels[idx]).mean()) if len(idx) else None
        return {"teacher": teacher.describe(), "teacher_probabilities": str(self.cache),
                "teacher_train_accuracy": accuracy(self.train, train_idx),
                "teacher_val_accuracy": accuracy(self.val, val_idx)}  # fmt: skip


def teacher_targets(teacher: Teacher, dataset: str, train: Dataset, val_fraction: float, split_seed: int,
                    cache: Path, batch_size: int, console, env) -> TeacherTargets:  # fmt: skip
    """The teacher's probabilities for the training and validation splits (the same --val-fraction
    and --split-seed semantics as `trainer train`): read from `cache` if it was made by this teacher
    from these images and this split, else computed (on the main rank under torchrun) and cached."""
    if not 0 <= val_fraction < 1:
        raise TrainerError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    key = {"format": CACHE_FORMAT, "teacher_sha256": teacher.sha256, "dataset": dataset, "val_fraction": val_fraction,
           "split_seed": split_seed, "train_images": fingerprint(train.images, train.labels)}  # fmt: skip
    cached = read_cache(cache, key)
    if cached is not None:
        if env.is_main:
            console.print(f"teacher probabilities: read from {cache} (made by this teacher from these images)")
        return TeacherTargets(cached["train"], cached["val"], cache, from_cache=True)
    arrays = None
    if env.is_main:
        train_idx, val_idx = split_train_validation(train.labels, val_fraction, split_seed)
        arrays = {
            "train": teacher_probabilities(teacher, train.images[train_idx], batch_size, console, "the training split")
        }
        classes = arrays["train"].shape[1]
        arrays["val"] = np.zeros((0, classes), np.float32)
        if len(val_idx):
            arrays["val"] = teacher_probabilities(
                teacher, train.images[val_idx], batch_size, console, "the validation split"
            )
        if classes != len(train.class_names):
            raise TrainerError(f"the teacher {teacher.path} gives {classes} probabilities per image; "
                               f"{dataset} has {len(train.class_names)} classes")  # fmt: skip
        write_cache(cache, key, arrays)
    if env.distributed:
        torch.distributed.barrier()  # the main rank has written the cache
        arrays = read_cache(cache, key)
    if arrays is None:
        raise TrainerError(f"{cache}: the teacher's probabilities were not written (see the main rank's error)")
    return TeacherTargets(arrays["train"], arrays["val"], cache, from_cache=False)
