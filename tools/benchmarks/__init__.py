"""Measurements: the step / encode / loader / memory benchmark (bench), random-weight modules of the
public SD shapes (bench_models), per-GPU memory estimates (memory_estimate) and `make gpu-check`
(gpu_check). BENCHMARKS.md holds the figures."""
