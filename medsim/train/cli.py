"""Arguments and command of `medsim train` (medsim/cli.py only wires them in)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medsim.train.config import OBJECTIVES, SELECTIONS, TRAIN_LAYERS, TrainConfig

    d = TrainConfig(images="", labels="", out="")
    parser.add_argument("--images", type=Path, required=True, help="folder of labeled images (DICOM/PNG/JPEG)")
    parser.add_argument("--labels", type=Path, required=True,
                        help="labels CSV: path and/or sop_uid, labels (|-separated), patient_id[, source]")
    parser.add_argument("--out", type=Path,
                        help="bundle directory to write (default: $MEDSIM_HOME/bundles/default, where build-index, "
                        "query, evaluate and serve find it)")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and history (default: .OUT-NAME.train beside OUT)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the work folder (same data and "
                        "settings; a finished run just re-writes its bundle; starts a new run when there is none)")
    parser.add_argument("--restart", action="store_true", help="discard a previous run in the work folder (wins over "
                        "--resume)")
    parser.add_argument("--restart-if-changed", action="store_true",
                        help="with --resume: a run started on other images, labels or settings is discarded and a "
                        "new one starts (what `make model` does), instead of stopping with an error")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at OUT")
    parser.add_argument("--init", help="start from this fine-tuned bundle instead of ImageNet VGG-16 (the labels "
                        "must map onto its vocabulary; patients keep the side of its split)")
    parser.add_argument("--label-map", action="append", metavar="OLD=NEW|FILE.json",
                        help="rename labels of the labels file (repeatable)")
    parser.add_argument("--objective", default=d.objective,
                        help=f"loss terms joined by '+', optionally weighted (0.5*supcon): {', '.join(OBJECTIVES)} "
                        f"(default: %(default)s)")
    parser.add_argument("--train-layers", default=d.train_layers, choices=list(TRAIN_LAYERS),
                        help="first VGG-16 layer that trains; earlier ones stay at ImageNet weights and their "
                        "activations are cached ('all': whole network on images, for --device cuda; 'none': "
                        "projection head only) (default: %(default)s)")
    parser.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help="projection size (default: "
                        "%(default)s)")
    parser.add_argument("--pooling", default=d.pooling, help="gap, gem or gem:P (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="maximum epochs (default: %(default)s)")
    parser.add_argument("--patience", type=int, default=d.patience,
                        help="early stopping: epochs without a better validation mAP@10 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate of VGG-16 layers (default: "
                        "%(default)s)")
    parser.add_argument("--head-lr", type=float, default=d.head_lr, help="learning rate of the projection and "
                        "classifier (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="supcon temperature (default: "
                        "%(default)s)")
    parser.add_argument("--views", type=int, default=d.views,
                        help="augmented views per training image cached besides the original (default: %(default)s)")
    parser.add_argument("--feature-augment", type=float, default=d.feature_augment,
                        help="probability of a random shift/scale of the cached activation grid (default: "
                        "%(default)s)")
    parser.add_argument("--validation-fraction", type=float, default=d.validation_fraction,
                        help="share of patients held out (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the split, augmentation and training "
                        "(default: %(default)s)")
    parser.add_argument("--select", default=d.select, choices=SELECTIONS,
                        help="validation mAP@10 that picks the best epoch: whole split, NIH images, their mean, or "
                        "'finding': the mean of the whole split and the NIH per-finding macro; 'last': no "
                        "selection, the last of --epochs is kept and the run never stops early (default: "
                        "%(default)s)")
    parser.add_argument("--rarity", type=float, default=d.rarity,
                        help="weight labels by frequency ** -RARITY in bce and supcon (0.5: inverse square root; 0: "
                        "all alike) (default: %(default)s)")
    parser.add_argument("--cross-source", type=float, default=d.cross_source,
                        help="supcon: weight of positives from another source family (default: %(default)s)")
    parser.add_argument("--source-balance", type=float, default=d.source_balance,
                        help="draw training images with weight (images of their source family) ** -S (1: every "
                        "family equally often; 0: uniform) (default: %(default)s)")
    parser.add_argument("--image-size", type=int, metavar="PIXELS",
                        help="side of the square model input the bundle is trained for and embeds at (default: the "
                        "starting bundle's, 224); a larger input keeps small findings larger in the trainable maps and "
                        "costs (PIXELS/224)^2 in the activation cache, training and every embedding")
    parser.add_argument("--leave-out", action="append", default=[], metavar="source=NAME|label=NAME",
                        help="leave the training images of this source, or with this label, out of training; the "
                        "split and the validation images stay the same, so a run with and one without them compare "
                        "on the same queries (repeatable; e.g. source=rsna)")
    parser.add_argument("--train-on", action="append", default=[], metavar="source=NAME|label=NAME",
                        help="train only on the training images of these sources or with these labels (repeatable; "
                        "any rule matches); the split and validation stay the same. With --init, the second stage "
                        "of the two-stage recipe: `make model` refines the general model on the images that carry "
                        "the full NIH finding vocabulary (docs/model-card.md)")
    parser.add_argument("--adversary", type=float, default=d.adversary,
                        help="gradient-reversal strength of the source head of the 'adv' objective (default: "
                        "%(default)s)")
    parser.add_argument("--feedback", type=Path, metavar="FILE.csv",
                        help="relevance votes from the viewer (`medsim feedback export`) as extra positive / negative "
                        "pairs; a vote names a training image by the SOP UID build-index gave it (DICOM: its "
                        "SOPInstanceUID; PNG/JPEG: from its path under --images); votes on other images or on the "
                        "validation split are reported and skipped")
    parser.add_argument("--feedback-weight", type=float, default=d.feedback_weight,
                        help="weight of the feedback term (default: %(default)s)")
    parser.add_argument("--device", default=d.device, help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=d.workers, help="data loader processes (default: "
                        "%(default)s)")
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap the steps of an epoch (smoke runs)")
    parser.add_argument("--name", default=d.name, help="bundle name (default: %(default)s)")
    parser.add_argument("--report", type=Path, help="also write the result (metrics, timings) as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines while caching")
    parser.add_argument("--no-int8-check", action="store_true", help="do not write int8 calibration images nor "
                        "check int8 against float32 on the validation split (the bundle then embeds in float32)")


def command(args) -> int:
    import torch

    from medsim.model import default_bundle_path
    from medsim.train.config import TrainConfig, TrainError
    from medsim.train.data import parse_label_map
    from medsim.train.run import Trainer

    try:
        import ignite  # noqa: F401
    except ImportError:
        raise TrainError("medsim train needs pytorch-ignite (MONAI's training engine): pip install 'medsim[train]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or default_bundle_path()
    config = TrainConfig(
        images=str(args.images), labels=str(args.labels), out=str(out),
        work_dir=str(args.work_dir) if args.work_dir else None, name=args.name, objective=args.objective,
        train_layers=args.train_layers, pooling=args.pooling, embedding_dim=args.embedding_dim, epochs=args.epochs,
        patience=args.patience, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
        weight_decay=args.weight_decay, temperature=args.temperature, views=args.views,
        feature_augment=args.feature_augment, validation_fraction=args.validation_fraction, seed=args.seed,
        select=args.select, rarity=args.rarity, cross_source=args.cross_source,
        source_balance=args.source_balance, adversary=args.adversary, leave_out=list(args.leave_out),
        train_on=list(args.train_on),
        image_size=args.image_size, init=args.init, label_map=parse_label_map(args.label_map), device=args.device,
        workers=args.workers, max_steps_per_epoch=args.max_steps_per_epoch, int8_check=not args.no_int8_check,
        feedback=str(args.feedback) if args.feedback else None, feedback_weight=args.feedback_weight,
    )
    try:
        trainer = Trainer(config, resume=args.resume, restart=args.restart, overwrite=args.overwrite,
                          restart_if_changed=args.restart_if_changed,
                          progress=not args.no_progress)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    try:
        result = trainer.run()
    except KeyboardInterrupt:
        import sys

        print(f"medsim train: interrupted; `medsim train ... --resume` continues from the last finished epoch "
              f"(checkpoints in {trainer.work_dir})", file=sys.stderr)
        raise
    print(f"bundle: {result.bundle_path} ({result.fingerprint})")
    print(f"best epoch {result.best_epoch} of {result.epochs_run}; validation mAP@10 "
          f"{result.validation.get('mAP@10', float('nan')):.3f} ({'starting bundle' if args.init else 'ImageNet'} "
          f"baseline {result.baseline.get('mAP@10', float('nan')):.3f}); {result.wall_seconds / 60:.1f} min")
    if args.report:
        from medsim.files import json_safe

        args.report.write_text(json.dumps(json_safe({
            "bundle": result.bundle_path, "fingerprint": result.fingerprint, "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "validation": result.validation, "baseline": result.baseline,
            "wall_seconds": result.wall_seconds, "history": result.history, "run_dir": result.run_dir,
            "timings": result.timings, "config": {k: getattr(config, k) for k in config.RESUME_KEYS + ("epochs",
                                                                                                  "device")}}),
            indent=2))
    return 0
