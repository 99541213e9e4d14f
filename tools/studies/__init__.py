"""Research studies on the toy world: robustness to flipped labels (robustness: the paper's Table 2 and
the minority metric), robustness without an oracle (noise_study), D3PO's online loop (d3po_study).
FINDINGS.md quotes them; docs/results/ holds copies of their tables and plots."""
