"""Merging (and one-shot compressing) checkpoints larger than memory, one decoder layer at a time from
sharded safetensors. `merge_checkpoint` is the pipeline (pipeline.py), `permute_checkpoint` the
weight-matching alignment alone (permute.py), `compress_checkpoint` one-shot compression of a merged
checkpoint (compress.py); `fits_in_memory` tells whether
the in-memory pipeline would fit a budget, so callers can switch automatically."""
from .memory import checkpoint_bytes, fits_in_memory, in_memory_bytes
from .compress import compress_checkpoint
from .permute import permute_checkpoint
from .pipeline import StreamingResult, merge_checkpoint

__all__ = ["merge_checkpoint", "permute_checkpoint", "compress_checkpoint", "fits_in_memory", "in_memory_bytes", "checkpoint_bytes",
           "StreamingResult"]
