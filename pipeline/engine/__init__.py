"""Engine: distributed set-up, the DeepSpeed config, precision, attention, rank-sharded EMA, checkpoints."""
