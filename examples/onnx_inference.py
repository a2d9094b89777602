"""Classify images with a model exported by ``python -m minidense.export``, in ONNX
Runtime alone: this script never imports minidense (what a deployment has is the .onnx
file, onnxruntime, NumPy and Pillow).

    python -m minidense.export runs/resnet20-cifar10/best.npz --out resnet20.onnx
    python examples/onnx_inference.py resnet20.onnx cifar10-jpeg.zip        # test/<class>/*
    python examples/onnx_inference.py resnet20.onnx photos/ --limit 5      # any images

IMAGES is a .zip or a folder.  Its ``test/<class>/*`` images are read when it has them
(and the accuracy is printed), else every PNG/JPEG image in it.  The class names and
the normalisation the model was trained with come from the file's metadata.
"""
import argparse
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(source: Path):
    """[(name, the bytes' reader, true class or None)]: test/<class>/* when there are
    such images, else every image; sorted by name."""
    if zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        names = [n for n in archive.namelist() if n.lower().endswith(SUFFIXES)]
        read = archive.read
    else:
        names = [str(p.relative_to(source)) for p in sorted(source.rglob("*"))
                 if p.suffix.lower() in SUFFIXES]
        read = lambda name: (source / name).read_bytes()   # noqa: E731
    tests = [n for n in names if n.startswith("test/") and n.count("/") == 2]
    chosen = tests or names
    return [(n, read, n.split("/")[1] if tests else None) for n in sorted(chosen)]


def preprocess(raw: bytes, size, mean, std):
    """RGB pixels resized to the model's input, in [0, 1], normalised, CHW float32."""
    with Image.open(io.BytesIO(raw)) as image:
        image = image.convert("RGB")
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return ((pixels - mean) / std).transpose(2, 0, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an .onnx file from minidense-export")
    parser.add_argument("images", help="a .zip or folder of images (test/<class>/* if it has them)")
    parser.add_argument("--limit", type=int, default=20, help="classify this many images (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    session = onnxruntime.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    model_input = session.get_inputs()[0]
    channels, height, width = model_input.shape[1:]
    mean = np.asarray(json.loads(meta.get("mean", "[0, 0, 0]")), dtype=np.float32)
    std = np.asarray(json.loads(meta.get("std", "[1, 1, 1]")), dtype=np.float32)
    classes = json.loads(meta["class_names"]) if "class_names" in meta else None
    version = meta.get("minidense_version", "?")
    print(f"{args.model}: {meta.get('model_name', '?')} (minidense {version}), "
          f"input {channels}x{height}x{width}")

    images = list_images(Path(args.images))
    if args.limit:
        # Spread over the classes: every k-th image, not the first class's only.
        images = images[::max(1, len(images) // args.limit)][:args.limit]
    correct = labelled = 0
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        batch = np.stack([preprocess(read(name), (height, width), mean, std)
                          for name, read, _ in chunk])
        (logits,) = session.run(None, {model_input.name: batch})
        for (name, _, truth), row in zip(chunk, logits):
            predicted = classes[int(row.argmax())] if classes else str(int(row.argmax()))
            mark = "" if truth is None else ("  ok" if predicted == truth else f"  (true: {truth})")
            print(f"{name}: {predicted}{mark}")
            if truth is not None:
                labelled += 1
                correct += predicted == truth
    if labelled:
        print(f"accuracy {100.0 * correct / labelled:.1f}% ({correct}/{labelled})")


if __name__ == "__main__":
    main()
