"""Making an existing network convergent by fine-tuning, without a DEQ solver: a torchvision ResNet-18 and a timm ViT,
each first trained the ordinary way on an image folder, then fine-tuned (a) with the extra-iteration loss and (b)
without it, the control that separates the objective from the extra epochs. The indices before and after come from
`train` itself (indices_before.json, indices.json); nothing is downloaded: the models start from random weights and
the folder is Digitclutter with one digit an image, written by `itconv-fast data imagefolder`.

The same from the command line (what this script runs, through the Python API):

    itconv-fast data imagefolder --out folder --train-size 2000 --val-size 500
    itconv-fast train --model torchvision:resnet18 --data imagefolder:folder --image-size 32 --out base
    itconv-fast train --model torchvision:resnet18 --weights base/checkpoint.pt --data imagefolder:folder \
        --image-size 32 --objective extra-iterations:1 --out tuned

    python examples/finetune_to_converge.py --out runs/finetune [--train-size 2000] [--epochs E] [--tune-epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from itconv_fast.data import digitclutter
from itconv_fast.data.image_folder import write_image_folder
from itconv_fast.experiments.config import build_config
from itconv_fast.experiments.training import train

MODELS = {  # name -> (model options, learning rate of the ordinary run at batch 128, its epochs)
    "torchvision:resnet18": (dict(image_size=32), 0.1, 10),
    "timm:vit_tiny_patch16_224": (dict(model_kwargs=dict(img_size=32, patch_size=8, depth=6)), 0.05, 30),
}
TUNE_LR_FACTOR = 0.1  # fine-tuning at a tenth of that: at the full rate the extra-iteration loss lost the task
RUNS = ("ordinary", "fine-tuned, extra-iterations:1", "fine-tuned, no objective")


def write_folder(root: str, train_size: int, val_size: int, seed: int = 0) -> str:
    """Digitclutter images of one digit each as root/train/<digit>/ and root/val/<digit>/ PNGs."""
    classes = [str(d) for d in range(10)]
    for split, size, offset in (("train", train_size, 0), ("val", val_size, 1)):
        images, labels = digitclutter.generate(size, 1, seed * 2 + offset)
        write_image_folder(os.path.join(root, split), images, labels.argmax(1), classes)
    return root


def run(model: str, folder: str, out: str, epochs, tune_epochs: int, seed: int) -> list:
    """The three runs of one model (epochs: of the ordinary run, None for the model's own number); returns one row
    per run (error, CI, RI, DI, seconds)."""
    options, lr, own_epochs = MODELS[model]
    epochs = epochs or own_epochs
    common = dict(model=model, data=f"imagefolder:{folder}", lr=lr, batch_size=64, seed=seed, compile=False, **options)
    base = os.path.join(out, "ordinary")
    started = time.perf_counter()
    train(build_config("quick", dict(common, epochs=epochs)), base, progress=False)
    rows = [_row(model, RUNS[0], base, time.perf_counter() - started)]
    tuned = dict(common, epochs=tune_epochs, weights=os.path.join(base, "checkpoint.pt"), lr=lr * TUNE_LR_FACTOR)
    for name, objectives in ((RUNS[1], {"extra-iterations": 1.0}), (RUNS[2], {})):
        path = os.path.join(out, "extra-iterations" if objectives else "control")
        started = time.perf_counter()
        train(build_config("quick", dict(tuned, objectives=objectives)), path, progress=False)
        rows.append(_row(model, name, path, time.perf_counter() - started))
    return rows


def _row(model: str, name: str, path: str, seconds: float) -> dict:
    with open(os.path.join(path, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    return {"model": model, "run": name, "seconds": seconds, "epochs": len(metrics["epochs"]), **metrics["indices"]}


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(rows: list) -> str:
    """Markdown: per run, the error and indices before (the weights it started from) and after."""
    lines = [
        "| model | run | epochs | error before | error after | CI after | RI after | DI before | DI after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['model']} | {r['run']} | {r['epochs']} | {_cell(b['error'])} | {_cell(a['error'])} | "
            f"{_cell(a['ci'])} | {_cell(a['ri'])} | {_cell(b['di'])} | {_cell(a['di'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/finetune-to-converge")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=None, help="ordinary training from random weights (10 / 30)")
    parser.add_argument("--tune-epochs", type=int, default=5, help="fine-tuning from the ordinary run")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = write_folder(os.path.join(args.out, "folder"), args.train_size, args.val_size)
    rows = []
    for model in args.models:
        rows += run(model, folder, os.path.join(args.out, model.replace(":", "-")), args.epochs, args.tune_epochs,
                    args.seed)  # fmt: skip
    text = table(rows)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    print(text)
    return rows


if __name__ == "__main__":
    main()
