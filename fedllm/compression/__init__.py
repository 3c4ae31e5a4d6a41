"""Compressed client updates (``--update_compression``) and communication accounting; docs/compression.md.

* :mod:`.config` -- :class:`~.config.CompressionArguments`, the federation's options (no torch);
* :mod:`.codecs` -- the codecs (int8, nf4, fp4 blockwise quantization; top-k), pure torch;
* :mod:`.updates` -- compressed uploads as files: the client's encoder with error feedback, the server's
  validator and the lazy reader aggregation streams through.

Compression is a codec around the wire format and upload ingestion, never a branch inside an algorithm:
every algorithm aggregates the decoded deltas as it aggregates dense ones.
"""

from .config import CODECS, CompressionArguments

__all__ = ["CODECS", "CompressionArguments"]
