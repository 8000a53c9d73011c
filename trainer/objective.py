"""What a run minimizes: the objective the training loop calls on every batch.

`trainer train` minimizes CrossEntropy (hard labels, the recipe's label smoothing);
`trainer distill` passes trainer/distill.py's KnowledgeDistillation instead. The loop in
train.py takes any object with this interface:

  prepare(hyper, data, device) -> targets   once per run, before the first batch: the
        per-sample tensors (in the order of data.train_labels) the loader hands out
        with each batch beside the labels, indexed like them (empty for plain training);
  __call__(logits, labels, *targets) -> (loss, parts)   the scalar loss to minimize and
        a detached 1-D tensor of the figures named in part_names, batch means;
  part_names  those figures (each becomes a history / metrics.csv column train_<name>);
  identity    what a resumed run must match (saved in checkpoint.pt; None for plain training);
  config_entries()  what config.json records about the objective.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossEntropy:
    """Cross-entropy on the hard labels, with the recipe's label smoothing."""

    part_names: tuple[str, ...] = ()
    identity: dict | None = None

    def prepare(self, hyper: dict, data, device: torch.device) -> tuple[torch.Tensor, ...]:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=hyper["label_smoothing"])
        return ()

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, *targets: torch.Tensor):
        loss = self.criterion(logits, labels)
        return loss, loss.new_zeros(0)

    def config_entries(self) -> dict:
        return {}
