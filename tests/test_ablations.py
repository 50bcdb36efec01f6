import json

import pytest
import torch

from pixformer import PixformerError
from pixformer.data.ablations import (apply_permutation, pixel_permutation, random_permutation, sample_swaps,
                                 swap_permutation)
from pixformer.cli import main
from pixformer.engine import TrainConfig, prepare_data


def is_bijection(perm, n):
    return sorted(perm.tolist()) == list(range(n))


def test_random_permutation_is_a_seeded_bijection():
    p = random_permutation(8, 6, seed=3)
    assert is_bijection(p, 48)
    assert torch.equal(p, random_permutation(8, 6, seed=3))
    assert not torch.equal(p, random_permutation(8, 6, seed=4))
    assert not torch.equal(p, torch.arange(48))


def test_apply_permutation_moves_whole_pixels():
    images = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5)
    perm = random_permutation(4, 5, seed=0)
    out = apply_permutation(images, perm)
    for i, src in enumerate(perm.tolist()):  # output pixel i is input pixel perm[i], every channel and image
        torch.testing.assert_close(out[:, :, i // 5, i % 5], images[:, :, src // 5, src % 5])
    assert apply_permutation(images, None) is images
    with pytest.raises(PixformerError, match="does not fit"):
        apply_permutation(images, random_permutation(4, 4, 0))


@pytest.mark.parametrize("h,w,delta", [(8, 8, 1), (16, 12, 2), (5, 9, 3)])
def test_local_swaps_count_and_distance(h, w, delta):
    T = 500
    pairs = sample_swaps(h, w, T, delta, seed=1)
    assert pairs.shape == (T, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    assert (a != b).all() and (a >= 0).all() and (b < h * w).all()
    chebyshev = torch.maximum((a // w - b // w).abs(), (a % w - b % w).abs())
    assert chebyshev.max() <= delta
    assert chebyshev.max() == delta  # the whole window is used, not just neighbours
    # the permutation is the swaps applied in order, each moving its two pixels by at most delta
    perm = swap_permutation(h, w, T, delta, seed=1)
    assert is_bijection(perm, h * w)
    expected = list(range(h * w))
    for x, y in pairs.tolist():
        expected[x], expected[y] = expected[y], expected[x]
    assert perm.tolist() == expected


def test_a_single_swap_moves_two_pixels_within_delta():
    h, w, delta = 10, 10, 2
    for seed in range(20):
        perm = swap_permutation(h, w, 1, delta, seed)
        moved = (perm != torch.arange(h * w)).nonzero().flatten()
        assert len(moved) == 2
        for i in moved.tolist():
            src = perm[i].item()
            assert max(abs(i // w - src // w), abs(i % w - src % w)) <= delta


def test_unbounded_swaps_reach_across_the_image():
    pairs = sample_swaps(16, 16, 2000, None, seed=0)
    a, b = pairs[:, 0], pairs[:, 1]
    assert torch.maximum((a // 16 - b // 16).abs(), (a % 16 - b % 16).abs()).max() > 8


def test_settings_pick_the_permutation_and_reject_bad_values():
    assert pixel_permutation(TrainConfig(), 8, 8) is None
    assert torch.equal(pixel_permutation({"permute_pixels": True, "permute_seed": 5}, 8, 8), random_permutation(8, 8, 5))
    assert torch.equal(pixel_permutation(TrainConfig(local_swaps=7, swap_distance=1), 8, 8),
                       swap_permutation(8, 8, 7, 1, 0))
    for bad, match in [(dict(permute_pixels=True, local_swaps=3), "choose one"),
                       (dict(local_swaps=-1), "local_swaps"), (dict(local_swaps=3, swap_distance=0), "swap_distance")]:
        with pytest.raises(PixformerError, match=match):
            pixel_permutation(bad, 8, 8)


@pytest.mark.parametrize("ablation", [dict(permute_pixels=True), dict(local_swaps=40, swap_distance=2)])
def test_train_and_test_images_get_the_same_permutation(ablation):
    plain = prepare_data(TrainConfig(data="digits"))
    cfg = TrainConfig(data="digits", **ablation)
    corrupted = prepare_data(cfg)
    perm = pixel_permutation(cfg, 8, 8)
    assert not torch.equal(perm, torch.arange(64))
    for split in ("train", "val", "test"):
        a, b = getattr(corrupted.splits, split), getattr(plain.splits, split)
        assert torch.equal(a.images, apply_permutation(b.images, perm)) and torch.equal(a.labels, b.labels)


def test_eval_applies_the_runs_permutation(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", "vit-n/2", "--depth", "1", "--dim", "16", "--heads", "2", "--epochs", "1",
            "--train-subset", "128", "--batch-size", "32", "--permute-pixels", "--permute-seed", "7",
            "--progress", "false"]
    assert main(["train", *args, "--out", str(out)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--checkpoint", str(out), "--data", "digits", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["top1"] == trained["test_top1"] and evaluated["loss"] == pytest.approx(trained["test_loss"])
    saved = json.loads((out / "checkpoint" / "state.json").read_text())["train_config"]
    assert saved["permute_pixels"] is True and saved["permute_seed"] == 7
    assert main(["eval", "--checkpoint", str(out), "--resolutions", "8,16"]) == 2   # permuted at its own size only
    assert "--resolutions resizes the images, but this run sees its pixels permuted" in capsys.readouterr().err


def test_a_pixel_transformer_without_position_embedding_ignores_the_permutation():
    from pixformer import create_model

    def features(model, images):  # pooled features (the classifier starts at zero)
        return model.pool(model.encode(model.prepend_cls(model.embed(images)[0])))
    x = torch.randn(2, 1, 8, 8)
    permuted = apply_permutation(x, random_permutation(8, 8, seed=0))
    pit = create_model("pit-n", img_size=8, in_chans=1, depth=1, dim=16, heads=2, pos_embed="none").eval()
    torch.testing.assert_close(features(pit, permuted), features(pit, x), atol=1e-5, rtol=1e-5)
    vit = create_model("vit-n/2", img_size=8, in_chans=1, depth=1, dim=16, heads=2, pos_embed="none").eval()
    assert not torch.allclose(features(vit, permuted), features(vit, x), atol=1e-3)
