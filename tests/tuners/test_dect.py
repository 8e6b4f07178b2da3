"""DecT: score formula, radius init, training on cached outputs only, collect() from causal LM / masked LM /
plain encoder (one query per text, no gradients), bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qpeft.tuners.dect import DecT
from test_prompt_tuning import CharTokenizer
from utils import tiny_bert, tiny_llama


def test_score_formula():
    dect = DecT(16, 3, proto_dim=8, logits_weight=0.7)
    with torch.no_grad():
        dect.radius.copy_(torch.tensor([0.1, -0.2, 0.3]))
    h, lg = torch.randn(5, 16), torch.randn(5, 3)
    z = F.normalize(h @ dect.proj.weight.t(), dim=-1)
    ref = torch.stack([-(z - dect.prototypes[k]).norm(dim=-1) for k in range(3)], -1) + 0.7 * lg + dect.radius
    torch.testing.assert_close(dect(h, lg), ref)
    assert not dect.prototypes.requires_grad
    assert {n for n, p in dect.named_parameters()} == {"proj.weight", "radius"}


def test_radius_init_is_mean_distance_to_class_centroid():
    dect = DecT(8, 2, proto_dim=4)
    h = torch.randn(10, 8)
    y = torch.tensor([0, 1] * 5)
    dect.init_radius(h, y)
    z = dect.project(h).detach()
    for k in range(2):
        zk = z[y == k]
        torch.testing.assert_close(dect.radius[k].detach(), (zk - zk.mean(0)).norm(dim=-1).mean())


def test_fit_learns_from_cached_outputs():
    torch.manual_seed(0)
    n, d = 120, 24
    y = torch.randint(0, 3, (n,))
    centers = torch.randn(3, d) * 2
    h = centers[y] + 0.5 * torch.randn(n, d)
    lg = torch.zeros(n, 3)  # uninformative label-word logits: the projection must learn the classes
    dect = DecT(d, 3, proto_dim=16)
    protos = dect.prototypes.clone()
    losses = dect.fit(h[:80], lg[:80], y[:80], epochs=60, lr=0.05)
    assert losses[-1] < 0.5 * losses[0]
    acc = (dect.predict(h[80:], lg[80:]) == y[80:]).float().mean().item()
    assert acc >= 0.9
    assert torch.equal(dect.prototypes, protos)  # prototypes stay fixed


def test_label_logits_weight_matters():
    h = torch.randn(6, 8)
    lg = torch.tensor([[5.0, -5.0]] * 3 + [[-5.0, 5.0]] * 3)
    dect = DecT(8, 2, proto_dim=4, logits_weight=10.0)
    assert torch.equal(dect.predict(h, lg), torch.tensor([0, 0, 0, 1, 1, 1]))


def test_collect_causal_lm_last_token():
    model, tok = tiny_llama(), CharTokenizer()
    texts = ["good", "bad movie", "ok"]
    h, s = DecT.collect(model, tok, texts, ["yes", "no"], template="{} !", calibrate=False)
    assert h.shape == (3, 64) and s.shape == (3, 2) and h.dtype == torch.float32
    for i, t in enumerate(texts):  # one sequence at a time, no padding
        ids = torch.tensor([tok._ids(f"{t} !")])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(h[i], out.hidden_states[-1][0, -1], rtol=1e-5, atol=1e-5)
        for k, w in enumerate(["yes", "no"]):
            torch.testing.assert_close(s[i, k], out.logits[0, -1, tok._ids(w, False)].max(), rtol=1e-5, atol=1e-5)
    _, cal = DecT.collect(model, tok, texts, ["yes", "no"], template="{} !", calibrate=True)
    _, free = DecT.collect(model, tok, ["N/A"], ["yes", "no"], template="{} !", calibrate=False)
    torch.testing.assert_close(cal, s - free)
    assert all(p.grad is None for p in model.parameters())


def test_collect_masked_lm_at_mask():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64)).eval()
    tok = CharTokenizer()
    h, s = DecT.collect(model, tok, ["great", "awful fi"], ["a", "b"], template="{} is @", calibrate=False)
    ids = torch.tensor([tok._ids("great is @")])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    pos = ids[0].tolist().index(3)
    torch.testing.assert_close(h[0], out.hidden_states[-1][0, pos], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s[0], out.logits[0, pos, [4 + ord("a") % 124, 4 + ord("b") % 124]],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="template must contain the mask token '@'"):
        DecT.collect(model, tok, ["x"], ["a", "b"], template="{}")


def test_collect_encoder_without_lm_head_and_end_to_end():
    model, tok = tiny_bert(), CharTokenizer()
    texts = ["aaa", "bbb", "aab", "bba", "abab", "baba"]
    h, s = DecT.collect(model, tok, texts, ["a", "b"], calibrate=False, batch_size=4)
    enc = tok(texts[:1], padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model(**enc).last_hidden_state.mean(1)[0]
        words = tok(["a", "b"], padding=True, return_tensors="pt")
        wv = model(**words).last_hidden_state.mean(1)
    torch.testing.assert_close(h[0], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s[0], F.cosine_similarity(pooled.unsqueeze(0), wv), rtol=1e-5, atol=1e-5)
    dect = DecT(64, 2, proto_dim=8)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    losses = dect.fit(h, s, y, epochs=20)
    assert losses[-1] < losses[0]


def test_bad_input():
    with pytest.raises(ValueError, match="num_labels must be an int >= 2"):
        DecT(8, 1)
    with pytest.raises(ValueError, match="proto_dim must be a positive int"):
        DecT(8, 2, proto_dim=0)
    dect = DecT(8, 2)
    with pytest.raises(ValueError, match=r"hidden must have shape \(N, 8\)"):
        dect(torch.randn(3, 7), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"label_logits must have shape \(3, 2\)"):
        dect(torch.randn(3, 8), torch.randn(3, 3))
    with pytest.raises(ValueError, match="labels must be int64"):
        dect.fit(torch.randn(3, 8), torch.randn(3, 2), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        dect.fit(torch.randn(3, 8), torch.randn(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="hidden contains non-finite"):
        dect.fit(torch.full((3, 8), float("nan")), torch.randn(3, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="template must contain"):
        DecT.collect(tiny_bert(), CharTokenizer(), ["x"], ["a", "b"], template="no slot")
    with pytest.raises(ValueError, match="label_words needs one word per class"):
        DecT.collect(tiny_bert(), CharTokenizer(), ["x"], ["a"])
