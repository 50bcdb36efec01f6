"""RandAugment, TrivialAugmentWide, random erasing and repeated augmentation (data/augment.py): each op
against values computed by hand, the policies as functions of the step's generator, and runs with them
resuming exactly; the torchrun check with repeated augmentation is in test_distributed.py."""
import pytest
import torch

import pixformer.data.augment as augment
from pixformer import PixformerError, TrainConfig, train
from pixformer.data.augment import (BINS, OPS, apply_ops, batch_indices, magnitudes, rand_augment, random_crop,
                                    random_erase, trivial_augment)
from pixformer.engine.loop import step_generator


def op(name: str, x: torch.Tensor, m: float = 0.0) -> torch.Tensor:
    """Every image of `x` through one op at magnitude m."""
    return apply_ops(x, torch.full((len(x),), OPS.index(name)), torch.full((len(x),), float(m)))


def u8(rows) -> torch.Tensor:
    """A (1, 1, H, W) uint8 image from nested lists."""
    return torch.tensor(rows, dtype=torch.uint8)[None, None]


GRID = u8([[10 * (4 * r + c) for c in range(4)] for r in range(4)])     # 0, 10, ..., 150


# ---- each op, by hand -----------------------------------------------------------------------------
def test_geometric_ops_move_whole_pixels_and_fill_black():
    g = GRID[0, 0].tolist()
    right = op("translate_x", GRID, 1.0)[0, 0]
    assert right.tolist() == [[0, *row[:3]] for row in g]
    up = op("translate_y", GRID, -1.7)[0, 0]                              # int(-1.7) = -1 pixel, as torchvision
    assert up.tolist() == [*g[1:], [0, 0, 0, 0]]
    assert torch.equal(op("rotate", GRID, 90.0), GRID.rot90(1, (-2, -1)))          # counter-clockwise
    assert torch.equal(op("rotate", GRID, -90.0), GRID.rot90(-1, (-2, -1)))
    # ShearX 0.5 about the top-left corner: row r reads column c + 0.5 (r + 0.5), nearest: shifts 0, 1, 1, 2
    assert op("shear_x", GRID, 0.5)[0, 0].tolist() == [g[0], [*g[1][1:], 0], [*g[2][1:], 0], [*g[3][2:], 0, 0]]
    assert torch.equal(op("shear_y", GRID, 0.5), op("shear_x", GRID.transpose(-2, -1), 0.5).transpose(-2, -1))


def test_colour_ops_against_values_computed_by_hand():
    x = u8([[0, 60, 100, 200]])
    assert op("brightness", x, -0.5).tolist() == u8([[0, 30, 50, 100]]).tolist()          # factor 0.5
    assert op("brightness", x, 0.5).tolist() == u8([[0, 90, 150, 255]]).tolist()          # 300 clipped
    half = u8([[0, 0, 100, 100]])                                                          # mean 50
    assert op("contrast", half, -0.5).tolist() == u8([[25, 25, 75, 75]]).tolist()        # 0.5 v + 0.5 * 50
    red = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red[:, 0] = 255                                                                        # gray 0.299 * 255
    assert op("color", red, -0.5)[0, :, 0, 0].tolist() == [166, 38, 38]                  # 127.5 + 38.12; 38.12
    assert torch.equal(op("color", x, -0.5), x)                                           # one channel: as is
    assert op("solarize", u8([[0, 127, 128, 255]]), 128.0).tolist() == u8([[0, 127, 127, 0]]).tolist()
    assert op("posterize", u8([[0, 15, 16, 200, 255]]), 4.0).tolist() == u8([[0, 0, 16, 192, 240]]).tolist()
    spot = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    spot[..., 1, 1] = 130                                  # blurred centre 5 * 130 / 13 = 50, borders kept
    assert op("sharpness", spot, -1.0)[0, 0].tolist() == [[0, 0, 0], [0, 50, 0], [0, 0, 0]]
    assert op("sharpness", spot, -0.5)[0, 0, 1, 1] == 90                                # 0.5 * 130 + 0.5 * 50


def test_autocontrast_stretches_each_channel_and_keeps_a_constant_one():
    x = torch.stack([u8([[50, 70, 75, 150]])[0, 0], u8([[7, 7, 7, 7]])[0, 0]])[None]     # (1, 2, 1, 4)
    out = op("autocontrast", x)[0]
    assert out[0].tolist() == [[0, 51, 64, 255]]                 # (v - 50) * 2.55: 51, 63.75
    assert out[1].tolist() == [[7, 7, 7, 7]]


def test_equalize_as_pil_and_torchvision():
    # 900 pixels, 300 each of 10, 20, 30: step (900 - 300) // 255 = 2; levels (cumsum before + 1) // 2
    x = torch.tensor([10, 20, 30], dtype=torch.uint8).repeat_interleave(300).view(1, 1, 30, 30)
    assert op("equalize", x).unique().tolist() == [0, 150, 255]           # 0, 301 // 2, 601 // 2 clipped
    assert torch.equal(op("equalize", GRID), GRID)                         # 16 pixels: step 0, as is


def test_magnitude_zero_is_identity_and_the_bins_are_torchvisions():
    x = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)            # no 255 (solarize's bin 0 inverts it)
    for wide in (False, True):
        table = magnitudes(wide, 8, 8)
        assert table.shape == (len(OPS), BINS)
        for name in OPS[:12]:                                          # every op with a magnitude, at bin 0
            assert torch.equal(op(name, x, float(table[OPS.index(name), 0])), x), name
    rand, wide = magnitudes(False, 662, 331), magnitudes(True, 8, 8)
    assert rand[OPS.index("translate_x"), 30] == pytest.approx(150.0)  # 150/331 of the width
    assert rand[OPS.index("translate_y"), 30] == pytest.approx(300.0)  # ... of the height
    assert wide[OPS.index("translate_x"), 30] == 32                    # wide: 32 pixels at any size
    assert rand[OPS.index("rotate"), 9] == pytest.approx(9.0) and wide[OPS.index("rotate"), 30] == 135
    assert rand[OPS.index("posterize"), [0, 9, 30]].tolist() == [8, 7, 4]
    assert wide[OPS.index("posterize"), [0, 30]].tolist() == [8, 2]
    assert rand[OPS.index("solarize"), [0, 30]].tolist() == [255, 0]


# ---- the policies ---------------------------------------------------------------------------------
BATCH = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("policy", [lambda x, g: rand_augment(x, 2, 9, g), trivial_augment])
def test_a_policy_is_a_function_of_the_steps_generator(policy):
    a, b = policy(BATCH, step_generator(0, 3)), policy(BATCH, step_generator(0, 3))
    assert a.dtype == torch.uint8 and a.shape == BATCH.shape and torch.equal(a, b)
    assert not torch.equal(a, policy(BATCH, step_generator(0, 4)))
    assert not torch.equal(a, BATCH)


def test_rand_augment_applies_n_ops_at_magnitude_m(monkeypatch):
    assert torch.equal(rand_augment(BATCH, 0, 9, torch.Generator()), BATCH)
    calls, real = [], augment.apply_ops
    monkeypatch.setattr(augment, "apply_ops", lambda x, o, m: calls.append((o, m)) or real(x, o, m))
    rand_augment(BATCH, 3, 9, torch.Generator().manual_seed(0))
    table = magnitudes(False, 8, 8)
    assert len(calls) == 3
    for o, m in calls:                      # each image one op a round, at bin 9, signed ones either sign
        assert torch.equal(m.abs(), table[o, 9]) and len(o.unique()) > 7
    signs = torch.cat([m for _, m in calls])
    assert (signs < 0).any() and (signs > 0).any()


def test_trivial_augment_draws_one_op_at_any_bin(monkeypatch):
    calls, real = [], augment.apply_ops
    monkeypatch.setattr(augment, "apply_ops", lambda x, o, m: calls.append((o, m)) or real(x, o, m))
    trivial_augment(BATCH, torch.Generator().manual_seed(0))
    (o, m), = calls
    rotations = m[o == OPS.index("rotate")].abs()
    assert rotations.max() <= 135 and len(rotations.unique()) > 1


def test_random_erasing_off_draws_nothing_and_on_erases_one_rectangle_each():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert random_erase(BATCH, 0.0, g) is BATCH and torch.equal(g.get_state(), state)
    x = torch.full((32, 3, 32, 32), 128, dtype=torch.uint8)
    out = random_erase(x, 1.0, torch.Generator().manual_seed(0))
    for changed in (out != x).any(1):                                     # (H, W) per image
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert changed.sum() >= 0.95 * h * w                              # a filled rectangle (noise may hit 128)
        # area 2-33 % of 1024 pixels, sides rounded: within [0.7 x 20.5, 1.1 x 341.3]
        assert 0.7 * 0.02 * 1024 <= h * w <= 1.1 * 1024 / 3 and 0.25 <= h / w <= 4.2
    assert len({tuple(c.nonzero()[0].tolist()) for c in (out != x).any(1)}) > 1   # not the same place


# ---- repeated augmentation -----------------------------------------------------------------------
def test_repeated_augmentation_repeats_each_image_k_times_in_as_many_steps():
    plain, rep = batch_indices(100, 12, 0, 0), batch_indices(100, 12, 0, 0, repeats=3)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat(plain), order[:96])                     # repeats 1: as before
    assert len(rep) == len(plain) == 8 and all(len(b) == 12 for b in rep)
    for i, b in enumerate(rep):                                          # 4 images a batch, 3 runs of them
        assert torch.equal(b, order[4 * i:4 * i + 4].repeat(3))
    assert len(torch.cat(rep).unique()) == 32                            # about a third of the images an epoch
    assert [len(b) for b in batch_indices(100, 10, 0, 0, repeats=3)] == [10] * 10   # 4 images, cut to 10
    copies = rand_augment(random_crop(BATCH[rep[0] % 64], 2, step_generator(0, 0)), 2, 9, step_generator(0, 0))
    assert all(not torch.equal(copies[j], copies[j + 4]) for j in range(4))   # each copy augmented on its own


# ---- settings and runs ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    (dict(rand_augment=[2, 31]), "--rand-augment must be N M with N >= 0, 0 <= M <= 30, got (2, 31)"),
    (dict(rand_augment=[-1, 9]), "--rand-augment must be"),
    (dict(rand_augment=[2, 9], trivial_augment=True), "choose one"),
    (dict(random_erase=1.5), "--random-erase must be a probability in [0, 1], got 1.5"),
    (dict(repeat_aug=0), "--repeat-aug must be in [1, --batch-size 128], got 0"),
    (dict(repeat_aug=33, batch_size=32), "--repeat-aug must be in [1, --batch-size 32], got 33"),
])
def test_bad_values_are_one_line_naming_the_option(bad, message):
    with pytest.raises(PixformerError) as e:
        TrainConfig(**bad)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("option", [dict(rand_augment=[2, 9]), dict(trivial_augment=True), dict(random_erase=0.25),
                                    dict(repeat_aug=2)])
def test_native_resolution_refuses_them_before_any_work(option, monkeypatch):
    import pixformer.engine.loop as loop
    monkeypatch.setattr(loop, "prepare_data", lambda cfg: pytest.fail("data loaded"))
    with pytest.raises(PixformerError) as e:
        train(TrainConfig(model="vit-n/2", data="digits", max_side=8, progress=False, **option))
    assert "turn them off at native resolution" in str(e.value) and "\n" not in str(e.value)


def test_a_run_saved_before_these_options_resumes_and_a_change_is_named():
    from pixformer.engine.config import as_json, changed_settings
    cfg = TrainConfig(model="vit-n/4", epochs=3)
    new = ("rand_augment", "trivial_augment", "random_erase", "repeat_aug")
    older = {k: v for k, v in as_json(cfg).items() if k not in new}        # as a run saved before they existed
    assert changed_settings(older, cfg) == []
    assert changed_settings(older, TrainConfig(model="vit-n/4", epochs=3, repeat_aug=3)) == ["repeat_aug: 1 -> 3"]


RUN = dict(model="vit-n/2", data="digits", model_args=dict(depth=1, dim=16, heads=2), batch_size=32, train_subset=192,
           epochs=2, progress=False, crop_padding=1, hflip=True)


@pytest.mark.parametrize("policy", [dict(rand_augment=[2, 9], random_erase=0.25, repeat_aug=3),
                                    dict(trivial_augment=True, repeat_aug=2)])
def test_a_run_with_them_resumes_exactly(policy, tmp_path, resumes_exactly):
    run = {**RUN, **policy}
    full = train(TrainConfig(**run, out=str(tmp_path / "full")))
    plain = train(TrainConfig(**RUN, out=str(tmp_path / "plain")))
    assert not torch.equal(full["model"].state_dict()["head.weight"], plain["model"].state_dict()["head.weight"])
    resumes_exactly(run, full)
