"""Running a forward: masks, CUDA graphs, compilation, host copies."""
