"""vitray: pretrain, fine-tune, track, serve and batch-score Vision Transformers on Ray."""
__version__ = "0.1.0"
