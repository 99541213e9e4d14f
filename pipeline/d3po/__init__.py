"""D3PO (Yang et al., CVPR 2024): the DDIM sampler step as a Gaussian policy (``ddim``), shared by the
sampler that records trajectories and the trainer that re-scores their transitions. The loss lives
with the other objectives in ``pipeline.losses.d3po``."""
