"""Classification: one label per image (``label`` column), top-1/top-5, ``POST /v1/classify``."""
