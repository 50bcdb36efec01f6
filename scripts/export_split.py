"""Write one split of a pixformer data source as an ImageFolder directory of PNG files.

    python scripts/export_split.py --data ../shared/data/cifar10-train-jpg.tar.gz --img-size 32 --split val --out runs/cifar10-val

`--split val` is the validation split `pixformer train` uses (the source's val/ folder, or the same
seeded hold-out of train), so a model trained on the rest can be evaluated on a separate folder:
    pixformer eval --checkpoint RUN --data runs/cifar10-val --json
"""
import argparse
import sys
from pathlib import Path

from PIL import Image

from pixformer import PixformerError
from pixformer.data import load_source, resolve_splits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="any source `pixformer train --data` takes")
    ap.add_argument("--split", choices=["train", "val", "test"], default="val")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="as the run's (train's default: 0.1)")
    ap.add_argument("--img-size", type=int, default=None, help="the images at N x N, as a run trained with "
                    "--img-size N decoded them (and from the same decode cache); default: their own size")
    ap.add_argument("--image-column", default=None, help="a Hugging Face dataset's image column, as train's")
    ap.add_argument("--label-column", default=None, help="a Hugging Face dataset's label column, as train's")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        if args.img_size is not None and args.img_size < 1:
            raise PixformerError(f"--img-size must be at least 1, got {args.img_size}")
        size = None if args.img_size is None else (args.img_size, args.img_size)
        found = load_source(args.data, img_size=size, image_column=args.image_column, label_column=args.label_column)
        data = resolve_splits(found, args.val_fraction, args.data).get(args.split)
    except PixformerError as e:
        sys.exit(f"export_split: {e}")
    out, folders = Path(args.out), set()
    for i, (img, label) in enumerate(zip(data.images, data.labels)):
        folder = out / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        folders.add(folder)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{i:05d}.png")
    print(f"wrote {len(data)} images in {len(folders)} class folders to {out}")


if __name__ == "__main__":
    main()
