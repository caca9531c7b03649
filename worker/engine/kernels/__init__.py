"""Hand-written Triton kernels, one module each, with the torch arithmetic they replace."""
