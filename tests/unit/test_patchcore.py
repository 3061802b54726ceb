"""PatchCore against the official algorithm written plainly, and brute-force scoring."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomaly_bench.methods import build_method, load_fitted_state
from anomaly_bench.methods.patchcore import aggregate_patches
from anomaly_bench.types import Batch

BACKBONE = {"name": "resnet18", "hub_tag": "tv_in1k", "pretrained": False, "weights": None}
LAYERS = {"layer1": None, "layer2": -1, "layer3": -1, "layer4": None}


def _batch(images):
    n = images.shape[0]
    return Batch(images=images, labels=torch.zeros(n, dtype=torch.long),
                 paths=[str(i) for i in range(n)], defect_types=["good"] * n)


def official_embedding(feats, patch=3, pretrain_dim=1024, embed_dim=1024):
    """The reference code's order: patchify, resize the unfolded patches, MeanMapper, Aggregator."""
    b = feats[0].shape[0]
    patches, shapes = [], []
    for f in feats:
        unf = F.unfold(f, kernel_size=patch, stride=1, padding=(patch - 1) // 2)
        unf = unf.reshape(b, f.shape[1], patch, patch, -1).permute(0, 4, 1, 2, 3)
        patches.append(unf)
        shapes.append(tuple(f.shape[-2:]))
    ref = shapes[0]
    for i in range(1, len(patches)):
        x = patches[i].reshape(b, *shapes[i], *patches[i].shape[2:]).permute(0, 3, 4, 5, 1, 2)
        base = x.shape
        x = F.interpolate(x.reshape(-1, 1, *shapes[i]), size=ref, mode="bilinear",
                          align_corners=False)
        x = x.reshape(*base[:-2], *ref).permute(0, 4, 5, 1, 2, 3)
        patches[i] = x.reshape(b, -1, *x.shape[-3:])
    flat = [p.reshape(-1, *p.shape[-3:]) for p in patches]
    mapped = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain_dim).squeeze(1)
              for x in flat]
    stacked = torch.stack(mapped, dim=1)
    return F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), embed_dim).squeeze(1)


@pytest.mark.parametrize(("c2", "c3", "pretrain", "embed"), [
    (512, 1024, 1024, 1024),  # WRN50: grouped-conv bins (layer2), whole-channel bins (layer3)
    (128, 256, 1024, 1024),   # ResNet18: bins straddle channels -> unfold path
    (128, 256, 384, 256), (128, 256, 100, 64), (64, 128, 64, 96),
    (100, 200, 96, 96),       # fused, but bins straddle channels -> unfold inside the fusion
])
def test_aggregation_equals_official_order(c2, c3, pretrain, embed):
    gen = torch.Generator().manual_seed(0)
    feats = {"layer2": torch.randn(2, c2, 8, 8, generator=gen),
             "layer3": torch.randn(2, c3, 4, 4, generator=gen)}
    ours = aggregate_patches(feats, 3, pretrain, embed).reshape(-1, embed)
    ref = official_embedding(list(feats.values()), 3, pretrain, embed)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 64, 64, generator=gen), torch.randn(3, 3, 64, 64, generator=gen)


def _model(**kw):
    cfg = {"name": "patchcore", "coreset_ratio": 1.0, "embed_dim": 64, "pretrain_dim": 96,
           "num_neighbors": 4, **kw}
    return build_method(cfg, BACKBONE, LAYERS, seed=0)


def test_scores_equal_brute_force(data):
    train, test = data
    model = _model()
    model.fit([_batch(train[:4]), _batch(train[4:])])
    pred = model.predict(_batch(test))
    with torch.inference_mode():
        bank = model.embed(train).reshape(-1, 64).double()
        emb = model.embed(test).double()
    assert torch.allclose(model.memory_bank.double(), bank, atol=1e-6)
    b, h, w, d = emb.shape
    scores, maps = [], []
    for i in range(b):
        dist = torch.cdist(emb[i].reshape(-1, d), bank)  # every patch to every bank entry
        s, nn = dist.min(dim=1)
        j = int(s.argmax())
        m_star = bank[nn[j]]
        support = torch.cdist(m_star[None], bank)[0].argsort()[:4]
        e = torch.exp(torch.cdist(emb[i].reshape(-1, d)[j][None], bank[support])[0])
        scores.append(float((1 - e[0] / e.sum()) * s[j]))  # paper eq. 7
        up = F.interpolate(s.view(1, 1, h, w), size=(64, 64), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        maps.append(gaussian_filter(up, 4, mode="mirror", truncate=4.0))
    np.testing.assert_allclose(pred.image_scores.double().numpy(), scores, rtol=1e-4)
    np.testing.assert_allclose(pred.anomaly_maps.double().numpy(), np.stack(maps), rtol=1e-4,
                               atol=1e-4)


def test_coreset_bank_is_the_reference_selection(data):
    from anomaly_bench.ops.coreset import coreset_size, random_projection, reference_greedy_coreset

    train, _ = data
    model = _model(coreset_ratio=0.1, projection_dim=16)
    model.fit([_batch(train)])
    with torch.inference_mode():
        feats = model.embed(train).reshape(-1, 64)
    n = coreset_size(len(feats), 0.1)
    idx = reference_greedy_coreset(random_projection(feats, 16, seed=0), n, seed=0)
    assert torch.equal(model.memory_bank, feats[idx])


def test_num_neighbors_one_is_the_plain_maximum(data):
    train, test = data
    model = _model(num_neighbors=1)
    model.fit([_batch(train)])
    pred = model.predict(_batch(test))
    with torch.inference_mode():
        emb = model.embed(test).reshape(3, -1, 64)
    best = torch.cdist(emb, model.memory_bank.expand(3, -1, -1)).min(dim=2).values.amax(1)
    torch.testing.assert_close(pred.image_scores, best, atol=1e-4, rtol=1e-4)


def test_state_round_trip(data):
    train, test = data
    model = _model(coreset_ratio=0.5)
    model.fit([_batch(train)])
    fresh = _model(coreset_ratio=0.5)
    load_fitted_state(fresh, model.state_dict(), "memory")
    assert torch.equal(fresh.predict(_batch(test)).image_scores,
                       model.predict(_batch(test)).image_scores)


def test_checkpoint_loaded_into_a_fitted_model_replaces_its_search(data):
    """Loading copies into the fitted bank in place: the search index follows the new bank."""
    train, test = data
    source, target = _model(coreset_ratio=0.5), _model(coreset_ratio=0.5)
    source.fit([_batch(train[:3])])
    target.fit([_batch(train[3:])])
    before = target.predict(_batch(test)).image_scores
    load_fitted_state(target, source.state_dict(), "memory")
    after = target.predict(_batch(test)).image_scores
    assert torch.equal(after, source.predict(_batch(test)).image_scores)
    assert not torch.equal(after, before)
