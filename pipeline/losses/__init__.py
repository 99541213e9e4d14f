"""Preference objectives: the diffusion inputs and errors every model shares (diffusion), pure per-pair
functions (dpo, adaptive, baselines, d3po, noise_model) and the registry the trainer picks from by
``objective.name`` (objectives)."""
