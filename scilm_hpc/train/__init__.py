"""Training: DeepSpeed engine setup, the training loop, checkpoint save / resume, export."""
