"""Data: Pick-a-Pic rows, image preprocessing, the shard format, label flips, the training loader."""
