"""Fine-tuning: data pipeline, loss, optimizer, train step, loop, checkpoints, metrics."""
