"""The trainer's two exceptions; the CLI turns each into one line and an exit status."""

from __future__ import annotations


class TrainerError(Exception):
    """Bad input a user can fix; the CLI prints the message on one line and exits 2."""


class TrainingInterrupted(Exception):
    """Ctrl-C: the checkpoint was saved; the message says how to resume."""
