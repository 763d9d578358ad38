"""Calibration sets: real inputs of a model (or of one submodule) on disk, validated, split and replayed.

A set is a folder: `manifest.json` plus `shard-NNNNN.safetensors` files, each holding whole
samples. A sample is one captured call, `Sample(args, kwargs)`, kept exactly as the module
received it: nested tuples/lists/dicts of tensors (KV caches, masks) and plain values (ints,
floats, strings, None). `CalibrationSet` opens and checks such a folder (or wraps samples in
memory), splits it into calibration and held-out parts, batches it and drives `mtq.quantize`.

Why safetensors and not the `datasets` Arrow format: samples are trees of tensors whose shapes
vary from sample to sample and from field to field (token lengths, KV-cache layers), in dtypes
Arrow has no type for (bfloat16, float8); safetensors stores each tensor's raw bytes with its
dtype and shape (bit-exact by construction), never unpickles anything (a shard from a stranger
cannot run code), reads one shard without the others, and needs only the small `safetensors`
package to load. The tree of each sample is JSON in the shard's header; the manifest carries the
per-field dtypes and shapes, the source, the model and module, and each shard's size and sha256.

Batching (`batches`, `forward_loop`): a set marked `batching: examples` holds one example per
sample, every tensor with a leading batch dimension of 1 that quantkit itself added (the built-in
text sets, whole-model inputs collected from text or tensor rows one row per call, synthetic
inputs). It is batched `batch_size` samples at a time: tensors are concatenated along dim 0 and,
for fields named in the set's `pad_values` (input_ids -> the tokenizer's pad id, attention_mask,
token_type_ids and position_ids -> 0), right-padded to the longest sample; samples whose other
shapes or plain values differ go to different batches (grouped by shape, in first-seen order).
Every other set (`batching: calls`: captured submodule or pipeline calls, where a leading 1 may
be no batch dimension at all, e.g. a timestep of shape [1]) is replayed one captured call per
batch, exactly as captured; `batch_size` does not apply to it.

The package is split by job: `codec` (a sample <-> JSON tree + tensors), `batching` (which samples
share a batch), `set_folder` (the on-disk format: manifest, shards, crash-safe writer),
`calibration_set` (`CalibrationSet`), `sources` (built-in and synthetic sets). Every public name is
importable from `quantkit.calib` as before.
"""

from quantkit.calib.batching import BATCHING_CALLS, BATCHING_EXAMPLES, batching_for, collate
from quantkit.calib.calibration_set import CalibrationSet
from quantkit.calib.codec import (Sample, call_model, decode_sample, describe_inputs, detached_copy, encode_sample,
                                  merge_fields, sample_fields, to_device)
from quantkit.calib.set_folder import (FORMAT, FORMAT_VERSION, MANIFEST, SHARD_PATTERN, SetWriter, read_manifest,
                                       read_shard, verify_shards, write_shard)
from quantkit.calib.sources import (builtin_names, builtin_set, calibration_dir, read_sentences, synthetic_samples,
                                    synthetic_set, text_pad_values, text_samples)

__all__ = [
    "BATCHING_CALLS", "BATCHING_EXAMPLES", "FORMAT", "FORMAT_VERSION", "MANIFEST", "SHARD_PATTERN",
    "CalibrationSet", "Sample", "SetWriter", "call_model", "describe_inputs",
    "batching_for", "builtin_names", "builtin_set", "calibration_dir", "collate", "decode_sample", "detached_copy",
    "encode_sample", "merge_fields", "read_manifest", "read_sentences", "read_shard", "sample_fields",
    "synthetic_samples", "synthetic_set", "text_pad_values", "text_samples", "to_device", "verify_shards",
    "write_shard",
]
