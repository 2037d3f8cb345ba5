"""The vocabulary lens: each layer's top tokens by similarity to the semantic bases."""

from __future__ import annotations

import torch

import vocabsem_fast as vs
from vocabsem_fast.app.lens import format_lens_table, vocabulary_lens

from tiny_models import WordTokenizer, tiny_llama


def test_lens_on_a_tiny_model_matches_the_reference_topk(tmp_path):
    model = tiny_llama(vocab=89)
    tokenizer = WordTokenizer(["the", "cat", "sat"], vocab_size=89)
    basis = vs.SemanticBasis.from_model(model, cache_dir=tmp_path, tokenizer=tokenizer)
    rows = vocabulary_lens(model, tokenizer, basis, "the cat sat", k=3)
    assert [r.layer for r in rows] == [0, 1, 2]
    with torch.no_grad():
        out = model(**tokenizer("the cat sat", return_tensors="pt"), output_hidden_states=True)
    last = out.hidden_states[-1][0, -1]  # already after the final norm
    values, indices = vs.reference.similarity_topk(last[None], basis.vectors, 3)
    torch.testing.assert_close(torch.tensor(rows[-1].similarities), values[0], rtol=1e-5, atol=1e-6)
    middle = model.model.norm(out.hidden_states[1][0, -1])  # intermediate layers pass the final norm
    values, _ = vs.reference.similarity_topk(middle[None], basis.vectors, 3)
    torch.testing.assert_close(torch.tensor(rows[1].similarities), values[0], rtol=1e-5, atol=1e-6)
    table = format_lens_table(rows)
    assert table.splitlines()[2].strip().startswith("emb") and len(table.splitlines()) == 2 + 3
