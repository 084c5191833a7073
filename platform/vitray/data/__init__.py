"""vitray data: pack image sources into Parquet shards, and stream them through Ray Data into the trainers.

This package knows no model: it turns images into batches of uint8 tensors and labels/boxes/masks."""
from .decode import DecodeError, decode_image, decode_mask
from .formats import Manifest, ManifestError, schema_for, split_of
from .sources import SOURCE_FORMATS, SourceError

__all__ = ["DecodeError", "Manifest", "ManifestError", "SOURCE_FORMATS", "SourceError", "decode_image", "decode_mask",
           "schema_for", "split_of"]
