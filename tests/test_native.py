"""Native resolution (NaViT's Patch n' Pack): packing, per-image attention and pooling, token dropping,
budgets, absolute / fractional position coordinates, training and any-resolution evaluation."""
import importlib
import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from pixformer import PixformerError, create_model, set_attention_backend
from pixformer.data.augment import normalize
from pixformer.data.native import NativeBatcher, bucket_size, fit_grid, kept_tokens, pack_sequences, pack_tight
from pixformer.layout import Packed
from pixformer.models.attention import AttnSpec, attention, segment_runs
from pixformer.models.packed import segment_mean

SIZES = [(12, 20), (16, 16), (8, 28), (20, 8), (4, 4)]   # (H, W), all multiples of patch 4
NORM = lambda x: normalize(x, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])  # noqa: E731


def images(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


@pytest.mark.parametrize("backend", ["auto", "varlen", "blocked", "math", "sdpa", "flex"])
@pytest.mark.parametrize("pool,pos", [("cls", "learned"), ("mean", "factorized"), ("mean", "sincos2d")])
def test_packed_images_give_what_each_gives_alone(backend, pool, pos):
    """Each image's logits from a pack equal the image run alone (fp32, 1e-5), for every backend
    that takes segment ids, with a class token or mean pooling and each kind of position embedding."""
    torch.manual_seed(0)
    model = create_model("vit-n/4", img_size=16, num_classes=7, depth=2, dim=32, heads=4, pool=pool, pos_embed=pos).eval()
    imgs = images()
    batcher = NativeBatcher(4, pool == "cls", max_side=28, pack_length=50, max_per_pack=3)
    packed = batcher(imgs, NORM)
    assert packed.segments.shape[0] < len(imgs)                 # several images share a sequence
    set_attention_backend(model, backend)
    with torch.no_grad():
        together = model(packed)                                # (M, 7)
        set_attention_backend(model, "math")
        alone = torch.cat([model(NORM(im[None])) for im in imgs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_packed_gradients_match_alone_through_the_default_kernel():
    torch.manual_seed(0)
    model = create_model("vit-n/4", img_size=16, num_classes=5, depth=2, dim=32, heads=4, pool="mean")
    imgs = images()
    y = torch.arange(len(imgs)) % 5
    loss = torch.nn.functional.cross_entropy(model(NativeBatcher(4, False, max_side=28, pack_length=64)(imgs, NORM)), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    alone = torch.cat([model(NORM(im[None])) for im in imgs])
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(alone, y), list(model.parameters()))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_pooling_ignores_padding_and_other_images():
    feats = torch.randn(2, 6, 3)
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    keep = seg >= 0
    out = segment_mean(feats, seg, keep, 3)
    torch.testing.assert_close(out[1], feats[0, 2:5].mean(0))
    changed = feats.clone()
    changed[0, 5] = 1e6                                     # padding
    changed[0, :2] += 5                                     # image 0
    assert torch.equal(segment_mean(changed, seg, keep, 3)[1:], out[1:])


def test_every_image_lands_in_exactly_one_pack_within_the_caps():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 200).tolist()
    packs = pack_sequences(lengths, 64, 5)
    assert sorted(i for p in packs for i in p) == list(range(200))
    assert all(sum(lengths[i] for i in p) <= 64 and len(p) <= 5 for p in packs)
    packed = NativeBatcher(4, True, max_side=28, pack_length=50)(images(), NORM)
    counts = torch.bincount(packed.segments[packed.segments >= 0], minlength=len(SIZES))
    assert counts.tolist() == [h * w // 16 + 1 for h, w in SIZES]      # every token (and a class slot) once
    assert packed.cls_slots.sum() == len(SIZES)
    assert packed.useful == sum(counts.tolist())


def test_unbucketed_packs_are_as_short_as_the_images_allow():
    """First fit at 10 packs 6, 5, 4, 3 as [6, 4], [5, 3]; two packs need at least 9 tokens each, and at 9
    first fit makes [6, 3], [5, 4]: two packs of 9. 32 images of 576 tokens at 1024: one a pack, 576 long.
    The batcher unbucketed packs so: 32 squares of 96 pixels at patch 4 give (32, 576), no padding."""
    assert pack_tight([6, 5, 4, 3], 10, 64) == ([[0, 3], [1, 2]], 9)
    assert pack_tight([6, 5, 4, 3], 10, 1) == ([[0], [1], [2], [3]], 6)
    packs, length = pack_tight([576] * 32, 1024, 64)
    assert length == 576 and sorted(i for p in packs for i in p) == list(range(32))
    squares = [torch.zeros(3, 96, 96, dtype=torch.uint8)] * 32
    packed = NativeBatcher(4, False, max_side=96, pack_length=1024, bucket=False)(squares, NORM)
    assert packed.segments.shape == (32, 576) and packed.useful == 32 * 576


def random_batches(n_batches: int, per_batch: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Batches of images with sides drawn from [8, 48], and a last, partial batch (a third as many)."""
    g = torch.Generator().manual_seed(seed)
    side = lambda: int(torch.randint(8, 49, (1,), generator=g))  # noqa: E731
    return [[torch.randint(0, 256, (3, side(), side()), generator=g, dtype=torch.uint8) for _ in range(n)]
            for n in [per_batch] * n_batches + [per_batch // 3]]


LADDER = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]


def by_image(packed: Packed) -> torch.Tensor:
    """Every image's patch vectors, image after image, wherever its pack put it."""
    seg = packed.segments[packed.segments >= 0]
    return packed.patches[packed.segments >= 0][torch.argsort(seg, stable=True)]


@pytest.mark.parametrize("pack_length", [None, 40])
def test_bucketing_bounds_the_shapes_a_run_sees(pack_length):
    """20 batches of 48 images of random sizes and a partial batch, with resolution sampling and Beta
    token dropping: bucketed, at most 4 distinct (P, L) shapes, on the ladder (L at most the pack length /
    the longest sequence); unbucketed at least twice as many (12 without a pack length, where L follows
    each batch's longest image; 13 with one, where L is each batch's shortest that fits). The same tokens
    either way."""
    assert [bucket_size(n) for n in range(1, 15)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16, 16]
    assert bucket_size(50, cap=49) == 64 and bucket_size(40, cap=45) == 45 and bucket_size(30, cap=45) == 32
    batcher = NativeBatcher(4, True, max_side=24, pack_length=pack_length, resolution_range=(12, 24),
                            token_drop_beta=(2.0, 5.0))                   # at most 6x6 tokens + a class token
    shapes = {True: set(), False: set()}
    for step, imgs in enumerate(random_batches(20, 48)):
        tight = replace(batcher, bucket=False)(imgs, NORM, torch.Generator().manual_seed(step), train=True)
        packed = batcher(imgs, NORM, torch.Generator().manual_seed(step), train=True)
        P, L = packed.segments.shape
        assert P in LADDER and (L == pack_length if pack_length else L in LADDER + [37])
        assert packed.useful == tight.useful and torch.equal(by_image(packed), by_image(tight))
        shapes[True].add((P, L))
        shapes[False].add(tuple(tight.segments.shape))
    assert len(shapes[True]) <= 4, sorted(shapes[True])
    assert len(shapes[False]) >= 2 * len(shapes[True]), sorted(shapes[False])


def pad_row(packed: Packed) -> Packed:
    """`packed` with one more pack, all padding (segment -1, no class slot, zero patches)."""
    extra = lambda t, fill: torch.cat([t, torch.full_like(t[:1], fill)])  # noqa: E731
    return Packed(extra(packed.patches, 0), extra(packed.coords, 0), extra(packed.grids, 1),
                  extra(packed.segments, -1), packed.n_images,
                  None if packed.cls_slots is None else extra(packed.cls_slots, False))


@pytest.mark.parametrize("backend", ["varlen", "flex", "sdpa", "blocked"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padding_rows_and_slots_leave_every_images_logits_unchanged(backend, pool):
    """Each image's logits and the gradients are the same from a tight pack, a bucketed one (more rows
    and slots of padding) and one with an all-padding row added, under each CPU backend (flex: forward;
    its backward runs "blocked"), with a class token or mean pooling, with and without a pack length."""
    torch.manual_seed(0)
    model = create_model("vit-n/4", img_size=16, num_classes=7, depth=2, dim=32, heads=4, pool=pool)
    set_attention_backend(model, backend)
    imgs, y = images(SIZES * 2, seed=1), torch.arange(2 * len(SIZES)) % 7
    for pack_length in (None, 50):
        tight = NativeBatcher(4, pool == "cls", max_side=28, pack_length=pack_length, max_per_pack=2, bucket=False)
        packs = [tight(imgs, NORM), replace(tight, bucket=True)(imgs, NORM)]
        packs.append(pad_row(packs[0]))
        assert packs[1].segments.numel() > packs[0].segments.numel()          # bucketing padded
        assert len({p.useful for p in packs}) == 1
        with torch.no_grad():
            want = model.eval()(packs[0])
            for p in packs[1:]:
                torch.testing.assert_close(model(p), want, atol=1e-6, rtol=1e-6)
        model.train()
        grads = [torch.autograd.grad(torch.nn.functional.cross_entropy(model(p), y), list(model.parameters())) for p in packs]
        for other in grads[1:]:
            for a, b in zip(other, grads[0]):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_data_and_layout_import_no_model():
    """pixformer.data.native and pixformer.layout load nothing of pixformer.models. A fresh interpreter,
    and the top-level package stood in for by a bare one (its __init__ imports the whole library)."""
    code = ("import importlib.util, sys, types; spec = importlib.util.find_spec('pixformer'); "
            "pkg = types.ModuleType('pixformer'); pkg.__path__ = list(spec.submodule_search_locations); "
            "sys.modules['pixformer'] = pkg; import pixformer.layout, pixformer.data.native; "
            "print([m for m in sys.modules if m.startswith('pixformer.models')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_token_dropping_keeps_the_ceiling_and_the_kept_coordinates():
    g = torch.Generator().manual_seed(0)
    assert len(kept_tokens(10, 0.25, g)) == math.ceil(10 * 0.75) == 8
    imgs = images()
    batcher = NativeBatcher(4, False, max_side=28, pack_length=64, token_drop=0.3)
    packed = batcher(imgs, NORM, torch.Generator().manual_seed(1), train=True)
    full = NativeBatcher(4, False, max_side=28, pack_length=64)(imgs, NORM)    # evaluation: nothing dropped
    for i, (h, w) in enumerate(SIZES):
        n = h * w // 16
        mine = packed.segments == i
        assert int(mine.sum()) == math.ceil(n * 0.7)
        assert int((full.segments == i).sum()) == n
        # each kept token carries the patch of its coordinates in the whole image
        ref = {tuple(c.tolist()): p for c, p in zip(full.coords[full.segments == i], full.patches[full.segments == i])}
        for c, p in zip(packed.coords[mine], packed.patches[mine]):
            assert torch.equal(ref[tuple(c.tolist())], p)


def test_budgets_keep_the_aspect_and_never_exceed():
    assert fit_grid(300, 200, 4, max_side=48) == (12, 8)
    gh, gw = fit_grid(300, 200, 4, max_tokens=50)
    assert gh * gw <= 50 and gh > gw
    assert fit_grid(20, 20, 4, max_side=100) == (5, 5)          # never up without a side
    assert fit_grid(20, 40, 4, max_side=100, side=80) == (10, 20)


def test_bad_packing_inputs_are_one_line_each():
    with pytest.raises(PixformerError, match="shorter than one image"):
        NativeBatcher(4, False, max_side=64, pack_length=100)       # a 16x16 grid is 256 tokens
    with pytest.raises(PixformerError, match="does not fit --pack-length"):
        pack_sequences([10, 70], 64, 4)
    with pytest.raises(PixformerError, match="needs a budget"):
        NativeBatcher(4, False)


def test_absolute_coordinates_refuse_to_extrapolate_and_fractional_ones_do_not():
    model = create_model("vit-n/4", img_size=16, num_classes=3, depth=1, dim=16, heads=2, pos_embed="factorized",
                         pos_coords="absolute")
    model(torch.randn(1, 3, 16, 8))                             # within the 4x4 table
    with pytest.raises(PixformerError, match="cannot extrapolate"):
        model(torch.randn(1, 3, 24, 16))
    frac = create_model("vit-n/4", img_size=16, num_classes=3, depth=1, dim=16, heads=2, pos_embed="factorized")
    assert frac(torch.randn(1, 3, 24, 16)).shape == (1, 3)


def test_packed_sequences_never_take_a_dense_mask_by_default():
    from pixformer.models.attention import auto_backend
    assert auto_backend("cpu", torch.float32, 10 ** 9, segments=True) == "varlen"
    assert auto_backend("cpu", torch.bfloat16, 10, segments=True) == "varlen"
    assert auto_backend("cuda", torch.bfloat16, 10, segments=True) == "flex"


def test_varlen_runs_need_contiguous_segments():
    assert segment_runs(torch.tensor([[0, 0, 1, -1]])) == [(0, 0, 2, 0), (0, 2, 3, 1), (0, 3, 4, -1)]
    assert segment_runs(torch.tensor([[0, 1, 0]])) is None
    q = torch.randn(1, 2, 3, 4)
    spec = AttnSpec(segment_ids=torch.tensor([[0, 1, 0]]))                  # falls back to "blocked"
    torch.testing.assert_close(attention(q, q, q, spec, backend="varlen")[0], attention(q, q, q, spec, backend="math")[0])


def test_varlen_groups_images_of_close_lengths_where_a_call_costs_more_than_the_padding(monkeypatch):
    """Lengths 10, 10, 11, 30, one head, a call costing 100 scores: [10, 10, 11] padded to 11 and [30]
    cost 100 + 3 * 121 + 100 + 900 = 1463, below 10, 10 | 11 | 30 (1521) and one group (3700); calls
    free: one group per distinct length; calls dear: one group."""
    A = importlib.import_module("pixformer.models.attention")
    monkeypatch.setattr(A, "VARLEN_CALL_SCORES", 100)
    assert A.group_lengths([30, 10, 11, 10], heads=1) == [[1, 3, 2], [0]]
    monkeypatch.setattr(A, "VARLEN_CALL_SCORES", 0)
    assert A.group_lengths([30, 10, 11, 10], heads=1) == [[1, 3], [2], [0]]
    monkeypatch.setattr(A, "VARLEN_CALL_SCORES", 10 ** 9)
    assert A.group_lengths([30, 10, 11, 10], heads=1) == [[1, 3, 2, 0]]


@pytest.mark.parametrize("call_scores", [0, 1 << 16, 10 ** 9])
def test_varlen_equals_the_segment_mask_with_and_without_padded_groups(monkeypatch, call_scores):
    """Two packs of images of 7, 5, 5, 3, 9 and 6 tokens and padding: "varlen" (each length alone, groups
    padded to their longest, one group) gives what "math" gives under the dense segment mask, outputs and
    q, k, v gradients (fp32, 1e-5), at every image token; padding tokens get zeros."""
    A = importlib.import_module("pixformer.models.attention")
    monkeypatch.setattr(A, "VARLEN_CALL_SCORES", call_scores)
    seg = torch.tensor([[0] * 7 + [1] * 5 + [2] * 5 + [-1] * 3, [3] * 3 + [4] * 9 + [5] * 6 + [-1] * 2])
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 3, 20, 8) * (seg >= 0)[:, None, :, None]               # a loss on image tokens only
    spec = AttnSpec(segment_ids=seg)
    got = attention(q, k, v, spec, backend="varlen")[0]
    want = attention(q, k, v, AttnSpec(segment_ids=seg), backend="math")[0]
    image = (seg >= 0)[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[image], want[image], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~image], torch.zeros_like(got[~image]))
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    groups = {0: 5, 1 << 16: 1, 10 ** 9: 1}[call_scores]                      # free calls: 3, 5 (two), 6, 7, 9
    plan = next(p for key, p in spec.cache.items() if key[0] == "varlen")
    assert len(plan.groups) == groups


def test_varlen_takes_packs_of_equal_images_as_they_lie():
    """Four images of 5 tokens in two packs: one group, the packs as they are (no gather, no scatter),
    and the same outputs and gradients as "math" under the segment mask (fp32, 1e-5)."""
    seg = torch.tensor([[0] * 5 + [1] * 5, [2] * 5 + [3] * 5])
    torch.manual_seed(0)
    qkv = torch.randn(2, 10, 3, 2, 4, requires_grad=True)                 # as the model's qkv: (B, N, 3, H, Dh)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    spec = AttnSpec(segment_ids=seg)
    got = attention(q, k, v, spec, backend="varlen")[0]
    want = attention(q, k, v, AttnSpec(segment_ids=seg), backend="math")[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad((got * w).sum(), qkv)[0], torch.autograd.grad((want * w).sum(), qkv)[0],
                               atol=1e-5, rtol=1e-5)
    plan = next(p for key, p in spec.cache.items() if key[0] == "varlen")
    assert [(n, length) for n, length, _ in plan.groups] == [(4, 5)] and plan.gather is None and plan.scatter is None


def _mixed_folder(root, per_class=10):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(10, 40)), int(rng.integers(10, 40))
            arr = np.full((h, w, 3), 200 if c == "a" else 40, np.uint8) + rng.integers(0, 30, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


NATIVE_RUN = dict(model="vit-n/4", model_args=dict(depth=1, dim=16, heads=2), batch_size=4, epochs=3,
                  max_side=24, pack_length=48, resolution_range=(12, 24), token_drop_beta=(2.0, 5.0), hflip=True,
                  val_fraction=0.25, progress=False)


def test_native_run_trains_resumes_exactly_and_evaluates_at_any_resolution(tmp_path, resumes_exactly, capsys):
    from pixformer import TrainConfig, train
    from pixformer.cli import main
    data = str(_mixed_folder(tmp_path / "photos"))
    full = train(TrainConfig(**NATIVE_RUN, data=data, out=str(tmp_path / "full")))
    assert full["val_n"] == 5
    logged = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["train_padding"] < 1 for r in logged if "train_loss" in r)   # padding reported
    resumes_exactly({**NATIVE_RUN, "data": data}, full)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "full"), "--split", "val", "--resolutions", "12,24,32"]) == 0
    table = capsys.readouterr().out
    assert "GFLOPs" in table and "32" in table
    rows = json.loads((tmp_path / "full" / "resolutions" / "resolutions.json").read_text())
    assert [r["resolution"] for r in rows] == [12, 24, 32]
    assert rows[0]["tokens"] < rows[1]["tokens"] < rows[2]["tokens"]
    assert (tmp_path / "full" / "resolutions" / "resolutions.png").exists()
    # each row is what that resolution alone gives (images decoded at its side, not scaled down from the largest):
    # at the run's own 24, plain eval's numbers
    assert main(["eval", "--checkpoint", str(tmp_path / "full"), "--split", "val", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--checkpoint", str(tmp_path / "full"), "--split", "val", "--resolutions", "24", "--json",
                 "--out", str(tmp_path / "alone")]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert rows[1]["loss"] == alone["loss"] == pytest.approx(plain["loss"], rel=1e-4)   # (packed otherwise: rounding)


def test_native_settings_refused_where_they_cannot_apply(tmp_path):
    from pixformer import TrainConfig, train
    with pytest.raises(PixformerError, match="cannot train convmixer-256/8 on them"):
        train(TrainConfig(model="convmixer-256/8", data="digits", max_side=8, progress=False))
    with pytest.raises(PixformerError, match="crop-padding"):
        train(TrainConfig(model="vit-n/2", data="digits", max_side=8, crop_padding=2, progress=False))
    with pytest.raises(PixformerError, match="different sizes"):
        train(TrainConfig(model="vit-n/4", data=str(_mixed_folder(tmp_path / "p")), progress=False))
    with pytest.raises(PixformerError, match=r"--resolution-range 24 96 draws longer sides above --max-side 48"):
        train(TrainConfig(model="vit-n/4", data="nowhere", max_side=48, resolution_range=[24, 96], progress=False))
