"""Pruning-aware pretraining: the data, the size and LR schedules, the training loop, its
checkpoints, distillation, and the events it reports."""
