"""The toy world: the tiny SD1.5/SDXL-shaped models, the tiny reward scorers, the Pick-a-Pic-format data
set with a known true preference, and their vocabulary. Built locally, no downloads; the tests, the demos,
the studies and the benchmarks use them."""
