"""The training recipe's library: workloads (what data and step a run trains on) and per-pair statistics."""
