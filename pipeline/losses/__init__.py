"""Preference objectives: pure per-pair functions (dpo, adaptive, baselines) and the registry the
trainer picks from by ``objective.name`` (objectives)."""
