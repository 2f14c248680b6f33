"""mcsmoe-fast: Merge, Then Compress (MC-SMoE) for Mixture-of-Experts models, with fused kernels."""
__version__ = "0.1.0"
