"""Training: the LightningModule, its losses and data, callbacks, checkpoints and quality metrics."""
