"""Checkpoints of merged and compressed models that are really smaller: safetensors holding each unique tensor
once plus JSON, never pickle. format.py (names, versions, config entries), atomic.py (temporary directories
renamed into place), weight_files.py (shards, index, reading tensors one at a time), save.py, load.py,
dense.py (the plain transformers export), source_stamp.py (inputs that change while a command reads them),
standard.py (+ standard_plan.py, standard_router.py: the family's own checkpoint with M experts) and plain_save.py
(transformers' own save refused on merged models).
"""
from .atomic import OWNER_FILE, atomic_directory, remove_stale_temporaries, scratch_directory
from .dense import to_dense
from .format import (
    FORMAT_VERSION, SHARDED_FORMAT_VERSION, WEIGHTS_METADATA, WEIGHTS_NAME, layer_entry, write_merged_config,
)
from .load import from_pretrained, open_weights, read_config_json, read_section
from .plain_save import PlainSaveRefused, guard_plain_save
from .save import FORMATS, save_pretrained
from .source_stamp import check_inputs, watching_inputs
from .standard import to_standard
from .weight_files import CheckpointError, ShardWriter, WeightFiles, WrittenWeights, parse_size

__all__ = ["CheckpointError", "FORMAT_VERSION", "OWNER_FILE", "PlainSaveRefused", "SHARDED_FORMAT_VERSION",
           "FORMATS", "ShardWriter", "WEIGHTS_METADATA", "WEIGHTS_NAME", "WeightFiles", "WrittenWeights", "atomic_directory",
           "from_pretrained", "guard_plain_save", "layer_entry", "open_weights", "parse_size", "read_config_json",
           "read_section", "check_inputs",
           "remove_stale_temporaries", "save_pretrained", "scratch_directory", "to_dense", "to_standard",
           "watching_inputs", "write_merged_config"]
