"""Object detection: boxes, their labels and crowd flags (``boxes``, ``box_labels``, ``box_crowd`` columns); ViTDet's
simple feature pyramid with a CenterNet head; COCO box mAP; ``POST /v1/detect``."""
