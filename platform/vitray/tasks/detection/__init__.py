"""Object detection: boxes and their labels (``boxes``, ``box_labels`` columns). Packed and streamed today;
training, export and inference come with their own modules."""
