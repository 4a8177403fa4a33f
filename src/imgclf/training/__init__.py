"""Training: the trainer (head on cached features), fine-tuning, schedules and
early stopping, checkpoints."""
