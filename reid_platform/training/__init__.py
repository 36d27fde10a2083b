"""Training: the per-worker loop, LR schedules, SWA and the Ray TorchTrainer."""
