"""An MAE export answers with embeddings: the encoder's pooled features (:mod:`vitray.tasks.embedding`)."""
from __future__ import annotations

from vitray.tasks.embedding import EmbeddingHead
from vitray.tasks.mae.data import CODEC

__all__ = ["HEAD"]

HEAD = EmbeddingHead(CODEC)
