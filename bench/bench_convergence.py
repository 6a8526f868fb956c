"""Does the classifier converge? ID accuracy against the epoch budget, with and without
augmentation, for the plain (no-OE) cells of a config.

    .venv/bin/python bench/bench_convergence.py [--config configs/fashion.yaml]
        [--root runs/fashion] [--epochs 5 10 20 40] [--loss softmax --loss arcface]

Each (loss, augmentation, budget) trains from the same initial weights in this process with
the grid's recipe (`classify/step.py: train_epoch`, AdamW, one-cycle over the budget, the
config's global batch: batch_size × num_workers), on the prepared ID training split of `--root`
(run `oodscale prepare CONFIG` first), and reads the accuracy on the ID validation and test
splits at the end. A one-cycle schedule depends on its budget, so each budget is its own run:
the curve is "what E epochs give", not one run's trajectory. Writes a record and a plot
(`--plot`, default docs/fashion_convergence.png).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import write_record  # noqa: E402

from oodscale.classify.augment import Augment  # noqa: E402
from oodscale.classify.checkpoints import classifier_from_card  # noqa: E402
from oodscale.classify.step import train_epoch  # noqa: E402
from oodscale.config import AugmentConfig, load_config  # noqa: E402
from oodscale.data.shards import read_manifest  # noqa: E402
from oodscale.data.streams import read_rows, reshuffled_batches  # noqa: E402
from oodscale.diffusion.quality import predict  # noqa: E402
from oodscale.distributed import make_accelerator, prepare  # noqa: E402
from oodscale.outliers import OutlierStream  # noqa: E402
from oodscale.runtime import RunLayout, open_storage  # noqa: E402

AUGMENTS = {"none": AugmentConfig(), "crop2+flip": AugmentConfig(crop_padding=2, flip=True)}


def accuracy(model, rows: dict[str, torch.Tensor]) -> float:
    """ID accuracy (%), read as the quality module's reference classifier is read."""
    probs, _ = predict(model.eval(), rows["image"].numpy())
    return 100 * float((probs.argmax(1) == rows["label"].numpy()).mean())


def train_once(cfg, card: dict, rows: dict, epochs: int, augment: AugmentConfig,
               ) -> tuple[float, torch.nn.Module]:
    """Train one plain cell for `epochs` from the card's initial weights: (seconds, model)."""
    from accelerate.state import AcceleratorState

    t = cfg.train
    AcceleratorState._reset_state(True)
    accelerator = make_accelerator("no", use_gpu=False)
    torch.manual_seed(0)
    model = classifier_from_card(card)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    batch = t.batch_size * t.num_workers  # the grid's global batch
    steps = len(rows["train"]["label"]) // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr,
                                                   total_steps=epochs * steps, pct_start=0.15)
    model, optimizer = prepare(accelerator, model, optimizer)
    id_batches = reshuffled_batches(rows["train"], batch, 0)
    outliers = OutlierStream("none", t.outlier_batch_size, card["num_classes"], 0, "cpu")
    started = time.perf_counter()
    for epoch in range(epochs):
        train_epoch(model, optimizer, accelerator, schedule, id_batches, outliers, steps,
                    t.lambda_oe, Augment(augment, epoch, "cpu"))
    return time.perf_counter() - started, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fashion.yaml")
    parser.add_argument("--root", default=None, help="run root holding data/ (default "
                                                     "storage.root/<config name>)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--loss", action="append", help="default: softmax and arcface")
    parser.add_argument("--plot", default="docs/fashion_convergence.png")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.config)
    root = Path(args.root) if args.root else Path(cfg.storage.root) / cfg.name
    layout = RunLayout(open_storage(str(root.parent)), root.name)
    manifest = read_manifest(layout.storage, layout.id_split("train"))
    rows = {split: {k: v for k, v in read_rows(layout.storage, layout.id_split(split)).items()
                    if k != "order"} for split in ("train", "val", "test")}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    for loss in args.loss or ["softmax", "arcface"]:
        t = cfg.train
        card = {"loss": loss, "backbone": t.backbone, "embedding_dim": t.embedding_dim,
                "head_options": t.head_options.get(loss, {}),
                "num_classes": len(manifest.class_names), "image_size": manifest.image_size,
                "channels": manifest.channels}
        for name, augment in AUGMENTS.items():
            for epochs in args.epochs:
                seconds, model = train_once(cfg, card, rows, epochs, augment)
                results.append({"loss": loss, "augment": name, "epochs": epochs,
                                "val": accuracy(model, rows["val"]),
                                "test": accuracy(model, rows["test"]), "seconds": seconds})
                print(results[-1], flush=True)
    lines = ["| loss | augment | epochs | ID val acc (%) | ID test acc (%) | train s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['loss']} | {r['augment']} | {r['epochs']} | {r['val']:.1f} | "
              f"{r['test']:.1f} | {r['seconds']:.0f} |" for r in results]
    body = (f"`{args.config}`'s plain cells on {len(rows['train']['label']):,} ID training "
            f"images ({manifest.image_size}x{manifest.image_size}), global batch "
            f"{cfg.train.batch_size * cfg.train.num_workers}, lr {cfg.train.lr}, one process; "
            f"validation {len(rows['val']['label'])} and test {len(rows['test']['label']):,} "
            f"ID images. crop2+flip = train.augment crop_padding 2, flip.\n\n"
            + "\n".join(lines) + "\n")
    plot(results, args.plot)
    print(body)
    if not args.no_write:
        command = "bench/bench_convergence.py " + " ".join(sys.argv[1:])
        print(f"record: {write_record('bench_convergence', command, body)}")


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    keys = dict.fromkeys((r["loss"], r["augment"]) for r in results)
    for loss, augment in keys:
        rows = [r for r in results if (r["loss"], r["augment"]) == (loss, augment)]
        ax.plot([r["epochs"] for r in rows], [r["val"] for r in rows], marker="o",
                linestyle="-" if augment == "none" else "--", label=f"{loss}, {augment}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epoch budget (one-cycle lr over it)")
    ax.set_ylabel("ID validation accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
