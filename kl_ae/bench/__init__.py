"""`kl-ae bench`: throughput and memory of the training step, the codec, the data pipeline, tiling (BENCHMARKS.md)."""
