"""Semantic segmentation: a class per pixel (``mask`` PNG column, 255 = ignore), mIoU, ``POST /v1/segment``."""
