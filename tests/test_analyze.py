import json
import math

import pytest
import torch

from pixformer import create_model
from pixformer.experiments.analyze import (AnalyzeConfig, analyze, attention_rollout, embedding_filters, mean_attention_distance,
                               pooled_attention, position_similarity, principal_filters, shown_positions,
                               token_centres)
from pixformer.cli import main
from pixformer.engine import TrainConfig, train

FIGURES = ["patch_embed_pca", "pos_embed_similarity", "attention_distance", "attention_maps"]


# ---- the numbers ---------------------------------------------------------------------------
def test_token_centres_are_in_pixels():
    assert token_centres((1, 3), 2).tolist() == [[0.5, 0.5], [0.5, 2.5], [0.5, 4.5]]
    assert token_centres((2, 2), 1).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


@pytest.mark.parametrize("prefix", [0, 1])
def test_attention_to_self_only_has_distance_zero(prefix):
    T = 16 + prefix
    probs = torch.eye(T).expand(2, 3, T, T)
    assert mean_attention_distance(probs, token_centres((4, 4), 2), prefix).abs().max() == 0


def test_mean_attention_distance_by_hand():
    # a 1x3 grid of 2x2 patches: centres 2 pixels apart
    w = torch.tensor([[0.5, 0.5, 0.0],    # query 0: half itself, half its neighbour -> 0.5 * 2 = 1
                      [0.0, 0.0, 1.0],    # query 1: the next patch -> 2
                      [1.0, 0.0, 0.0]])   # query 2: two patches away -> 4
    d = mean_attention_distance(w[None, None], token_centres((1, 3), 2))
    assert d.shape == (1, 1) and d.item() == pytest.approx(7 / 3)
    # the same with a class token that takes half of every query's attention: dropped, rest renormalised
    with_cls = torch.zeros(4, 4)
    with_cls[:, 0] = 0.5
    with_cls[1:, 1:] = w / 2
    with_cls[0, 1:] = 0.5 / 3
    assert mean_attention_distance(with_cls[None, None], token_centres((1, 3), 2), 1).item() == pytest.approx(7 / 3)
    # a 2x2 grid of 2x2 patches, every query attending its diagonal opposite: 2*sqrt(2) pixels
    diag = torch.eye(4).flip(1)
    assert mean_attention_distance(diag[None, None], token_centres((2, 2), 2)).item() == pytest.approx(2 * math.sqrt(2))


@pytest.mark.parametrize("pos_embed", ["learned", "sincos2d"])
def test_position_similarity_to_itself_is_one(pos_embed):
    model = create_model("pit-n", img_size=6, depth=1, dim=16, heads=2, pos_embed=pos_embed)
    sim = position_similarity(model.position_embedding(model.pos_grid))
    assert sim.shape == (36, 36)
    assert torch.allclose(sim.diagonal(), torch.ones(36), atol=1e-5)
    assert torch.allclose(sim, sim.T, atol=1e-6) and sim.abs().max() <= 1 + 1e-5


def test_shown_positions():
    assert shown_positions(5) == [0, 1, 2, 3, 4]
    rows = shown_positions(32)
    assert len(rows) == 8 and rows[0] == 0 and rows[-1] == 31


def test_embedding_filters_match_the_patch_embedding():
    """Filter d of a ViT, laid over a patch, gives the patch embedding's output d (less the bias)."""
    model = create_model("vit-n/2", img_size=4, depth=1, dim=8, heads=2, in_chans=3)
    x = torch.randn(1, 3, 4, 4)
    patches, _ = model.patchify(x)
    want = model.patch_embed(patches)[0, 0] - model.patch_embed.bias                 # first patch, (D,)
    got = (embedding_filters(model) * x[0, :, :2, :2]).sum(dim=(1, 2, 3))
    assert torch.allclose(got, want, atol=1e-6)


def test_principal_filters_recover_the_direction():
    torch.manual_seed(0)
    colour = torch.tensor([-0.6, 0.0, 0.8])
    filters = (torch.randn(64, 1) * colour + 0.01 * torch.randn(64, 3)).reshape(64, 3, 1, 1)  # pixel filters
    comps, explained = principal_filters(filters)
    assert comps.shape == (3, 3, 1, 1) and explained.shape == (3,)
    assert torch.allclose(comps[0].flatten(), colour, atol=0.02)       # signed: largest entry positive
    assert explained[0] > 0.99 and explained.sum() == pytest.approx(1.0, abs=1e-5)


def test_attention_rollout():
    T = 5
    assert torch.allclose(attention_rollout([torch.eye(T)[None]] * 3), torch.eye(T))
    uniform = torch.full((2, T, T), 1.0 / T)
    r = attention_rollout([uniform])
    assert torch.allclose(r, (uniform[0] + torch.eye(T)) / 2)
    assert torch.allclose(attention_rollout([uniform, torch.eye(T)[None]]).sum(-1), torch.ones(T))
    assert pooled_attention(r, 1).shape == (T - 1,) and pooled_attention(r, 0).shape == (T,)


# ---- the command ---------------------------------------------------------------------------
def tiny_run(path, **settings):
    cfg = dict(model="pit-n", data="digits", model_args=dict(depth=1, dim=16, heads=2), epochs=1, train_subset=64,
               progress=False)
    train(TrainConfig(**{**cfg, **settings, "out": str(path)}))
    return path


@pytest.fixture
def pit_run(tmp_path):
    return tiny_run(tmp_path / "pit")


def test_analyze_writes_every_figure(pit_run, tmp_path, capsys):
    assert main(["analyze", "--checkpoint", str(pit_run), "--num-images", "8", "--heads", "1", "--layer", "-1",
                 "--image-index", "3"]) == 0
    out = pit_run / "analysis"                              # the default: inside the run folder
    summary = json.loads((out / "analysis.json").read_text())
    for name in FIGURES:
        assert summary[name] == {"applies": True, "png": f"{name}.png", "json": f"{name}.json"}
        assert (out / f"{name}.png").stat().st_size > 1000
    dist = json.loads((out / "attention_distance.json").read_text())
    assert len(dist["per_layer_head"]) == 1 and len(dist["per_layer_head"][0]) == 2     # 1 layer, 2 heads
    assert all(0 < d < 8 * math.sqrt(2) for d in dist["per_layer_head"][0])
    assert "class token excluded" in dist["cls_token"] and dist["num_images"] == 8
    maps = json.loads((out / "attention_maps.json").read_text())
    assert maps["heads"] == [1] and len(maps["rollout"]) == 8 and len(maps["rollout"][0]) == 8
    pe = json.loads((out / "pos_embed_similarity.json").read_text())
    assert all(m[r][c] == pytest.approx(1.0, abs=1e-4) for k, m in pe["maps"].items()
               for r, c in [map(int, k.split(","))])

    capsys.readouterr()
    for args, message in [(["--heads", "2"], "head 2 does not exist"), (["--layer", "1"], "layer 1 does not exist"),
                          (["--image-index", "100000"], "out of range"), (["--num-images", "0"], "at least 1")]:
        assert main(["analyze", "--checkpoint", str(pit_run), "--out", str(tmp_path / "b"), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()                   # bad choices are caught before anything is written
    assert main(["analyze", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_figures_that_do_not_apply_are_reported(tmp_path, capsys):
    """No position embedding: that figure is skipped with a reason, the rest written. The run also
    permuted its pixels, so the analysis sees them permuted and measures distance both ways."""
    run = tiny_run(tmp_path / "nope", model_args=dict(depth=1, dim=16, heads=2, pool="mean", pos_embed="none"),
                   permute_pixels=True)
    summary = analyze(AnalyzeConfig(checkpoint=str(run), num_images=4))
    assert summary["pos_embed_similarity"] == {"applies": False, "reason": "VisionTransformer has no position "
                                               "embedding (pos_embed='none')"}
    assert "pos_embed_similarity: does not apply" in capsys.readouterr().out
    assert not (run / "analysis" / "pos_embed_similarity.png").exists()
    for name in ("patch_embed_pca", "attention_distance", "attention_maps"):
        assert (run / "analysis" / f"{name}.png").exists()
    dist = json.loads((run / "analysis" / "attention_distance.json").read_text())
    assert "permuted" in dist["images"] and len(dist["per_layer_head_unpermuted"][0]) == 2


def test_convmixer_gets_its_filters_only(tmp_path):
    run = tiny_run(tmp_path / "cm", model="convmixer-16/1", model_args=dict(patch_size=2))
    summary = analyze(AnalyzeConfig(checkpoint=str(run)))
    assert summary["patch_embed_pca"]["applies"]
    assert [summary[n]["reason"] for n in FIGURES[1:]] == ["ConvMixer has no position embedding",
                                                          "ConvMixer has no attention layers",
                                                          "ConvMixer has no attention layers"]
    comps = json.loads((run / "analysis" / "patch_embed_pca.json").read_text())
    assert comps["filters_shape"] == [16, 1, 2, 2] and len(comps["explained_variance"]) == 4
