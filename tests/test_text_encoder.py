"""The caption encoder: the package-shipped all-MiniLM-L6-v2 weights, vitray's torch BERT against transformers'
BertModel on the same weights, and sentence similarities that make sense for layout captions."""
from __future__ import annotations

import pytest
import torch

from vitray.models.text_encoder import SentenceEncoder, TextEncoderError, text_encoder_dir

SENTENCES = ["a small 7 at the top left", "a tiny seven in the upper left corner", "a big 2 at the bottom",
             "two items: a large 2 at the bottom and a 3 in the centre", "the cat sat on the mat"]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder.from_package("all-MiniLM-L6-v2")


def test_matches_transformers_bert_with_mean_pooling(encoder):
    transformers = pytest.importorskip("transformers")
    path = text_encoder_dir("all-MiniLM-L6-v2")
    ref = transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval()
    ids, mask = encoder.tokenize(SENTENCES)
    assert ids.shape[0] == len(SENTENCES) and (mask.sum(1) < ids.shape[1]).any()  # padding is exercised
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        theirs = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        ours = encoder(ids, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_similar_captions_are_near_and_the_encoder_is_frozen(encoder):
    e = encoder.encode(SENTENCES)
    assert e.shape == (5, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]  # same digit and place, other words
    assert sim[2, 3] > sim[2, 1]  # both mention a 2 at the bottom
    assert (sim[4, :4] < sim[0, 1]).all()
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    torch.testing.assert_close(encoder.encode(SENTENCES[:2]), e[:2], rtol=0, atol=1e-5)  # padding: same vectors


def test_unknown_encoders_and_altered_weights_are_refused(tmp_path, monkeypatch):
    from vitray.models import text_encoder as te

    with pytest.raises(TextEncoderError, match="unknown text encoder 'bert-huge'"):
        SentenceEncoder.from_package("bert-huge")
    monkeypatch.setitem(te.TEXT_ENCODERS, "all-MiniLM-L6-v2", (*te.TEXT_ENCODERS["all-MiniLM-L6-v2"][:2], "0" * 64))
    te._checked.cache_clear()
    with pytest.raises(TextEncoderError, match="expected 000000000000"):
        SentenceEncoder.from_package("all-MiniLM-L6-v2")
    te._checked.cache_clear()
