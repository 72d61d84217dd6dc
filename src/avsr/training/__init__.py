"""Training: the loop (:mod:`.loop`), DDP setup (:mod:`.distributed`), checkpoints
(:mod:`.checkpoint`), learning-rate schedules (:mod:`.schedules`), checkpoint averaging
(:mod:`.averaging`), validation (:mod:`.validate`) and tensorboard output (:mod:`.monitor`)."""

from avsr.training.checkpoint import CheckpointError, load_checkpoint, load_model

__all__ = ["CheckpointError", "load_checkpoint", "load_model"]
