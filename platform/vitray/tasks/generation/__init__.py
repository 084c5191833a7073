"""Generation: a diffusion transformer (DiT, :mod:`vitray.models.dit`) trained with rectified flow
(:mod:`vitray.models.flow`) to draw an image for a caption (encoded by a frozen sentence encoder,
:mod:`vitray.models.text_encoder`) or for a class."""
