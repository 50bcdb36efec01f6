"""Write one split of a pixformer data source as an ImageFolder directory of PNG files.

    python scripts/export_split.py --data ../shared/data/cifar10-train-jpg.tar.gz --split val --out runs/cifar10-val

`--split val` is the validation split that `pixformer train` holds out of a source without a test
split (same fraction and seed), so a model trained on the rest can be evaluated on a separate folder:
    pixformer eval --checkpoint RUN --data runs/cifar10-val --json
"""
import argparse
from pathlib import Path

from PIL import Image

from pixformer.data import holdout, load_source


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", choices=["train", "val", "test"], default="val")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    splits = load_source(args.data)
    if args.split == "test":
        data = splits["test"]
    else:
        base = splits.get("train", splits.get("all"))
        train_idx, val_idx = holdout(len(base), args.val_fraction, seed=0)
        data = base.subset(val_idx if args.split == "val" else train_idx)
    out = Path(args.out)
    for i, (img, label) in enumerate(zip(data.images, data.labels)):
        folder = out / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{i:05d}.png")
    print(f"wrote {len(data)} images in {len(data.classes)} class folders to {out}")


if __name__ == "__main__":
    main()
