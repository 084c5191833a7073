"""MAE: masked-autoencoder pretraining of a ViT encoder on unlabeled images; the encoder is exported as a backbone
(embeddings, ``POST /v1/embed``, ``model.checkpoint`` of any other task)."""
