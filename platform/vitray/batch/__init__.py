"""vitray batch: score any number of images with a registered model on Ray Data (``vitray score``), each input
unit written exactly once. Nothing here imports the training stack."""
from .inputs import InputError, discover
from .score import ScoreSummary, score

__all__ = ["score", "ScoreSummary", "discover", "InputError"]
