"""The training loop: MONAI's ``SupervisedTrainer`` over the training set, ``SupervisedEvaluator`` scoring validation
retrieval (mAP@10, :class:`RetrievalMAP`) after every epoch, and the handlers that checkpoint (the last epoch for
``--resume``, the best validation epoch), resume, stop early and schedule the learning rate. Each finished epoch adds
a row to the run's history."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.metrics import Metric

from medsim.train.config import FEATURES_END, TRAIN_LAYERS, TrainConfig
from medsim.train.datasets import INPUT
from medsim.train.features import POOL4_END
from medsim.train.objectives import (RetrievalLoss, RetrievalNet, cosine_schedule_lambda, label_weights,
                                     parse_objective)
from medsim.train.transforms import RandFeatureJitter
from medsim.train.validation import K, fmt, headline
from medsim.train.workdir import LAST_CHECKPOINT_PREFIX, RunFolder

SELECT = "val_select"  # the evaluator's key metric: the selection score of the epoch


class RetrievalMAP(Metric):
    """Validation retrieval (ignite metric): gathers the embeddings of the validation split in any order, and
    ``compute()`` returns ``score(report(embeddings))`` with the embeddings in ``val_idx`` order; the full report
    of the last compute is ``last_report``."""

    def __init__(self, val_idx: Sequence[int], report: Callable[[np.ndarray], dict], score: Callable[[dict], float],
                 output_transform: Callable = lambda output: output):
        self.position = {int(v): n for n, v in enumerate(val_idx)}  # record index -> row of the embeddings
        self.report = report
        self.score = score
        self.last_report: dict | None = None
        self._emb: list[torch.Tensor] = []
        self._idx: list[torch.Tensor] = []
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._emb, self._idx = [], []

    def update(self, output) -> None:
        emb, idx = output
        self._emb.append(emb.detach().float().cpu())
        self._idx.append(idx.detach().cpu())

    def compute(self) -> float:
        emb = torch.cat(self._emb).numpy()
        rows = [self.position[int(i)] for i in torch.cat(self._idx).numpy()]
        if sorted(rows) != list(range(len(self.position))):
            raise RuntimeError("validation did not see every validation image once")
        ordered = np.empty_like(emb)
        ordered[rows] = emb
        self.last_report = self.report(ordered)
        return self.score(self.last_report)


def prepare_batch(batchdata, device=None, non_blocking=False, **kwargs):
    """A collated batch -> (network input, {"labels", "patient", "index"}) on ``device``."""
    x = batchdata[INPUT]
    x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device, non_blocking=non_blocking)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    targets = {"labels": torch.as_tensor(batchdata["labels"]).float().to(device),
               "patient": torch.as_tensor(batchdata["patient"]).long().to(device),
               "index": torch.as_tensor(batchdata["index"]).long().to(device)}
    if "source" in batchdata:
        targets["source"] = torch.as_tensor(batchdata["source"]).long().to(device)
    return x, targets


def source_balanced_weights(sources: Sequence[int], strength: float) -> torch.Tensor:
    """Sampling weight of each training item: (items of its source family) ** -strength (0: uniform; 1: every
    family drawn equally often)."""
    s = np.asarray(sources, dtype=np.int64)
    counts = np.bincount(s)
    return torch.as_tensor(counts[s].astype(np.float64) ** (-float(strength)))


def fit(net: RetrievalNet, train_ds, val_ds, *, config: TrainConfig, device: torch.device, folder: RunFolder,
        resume: bool, val_idx: Sequence[int], report: Callable[[np.ndarray], dict], score: Callable[[dict], float],
        elapsed: Callable[[], float], say: Callable[[str], None],
        on_epoch: Callable[[dict], None] | None = None, label_frequency: Sequence[float] | None = None,
        feedback=None) -> list[dict]:
    """Train ``net`` for the epochs ``config`` asks (continuing the checkpoint in ``folder`` when ``resume``) and
    return the history, one row per epoch. ``report`` turns validation embeddings (``val_idx`` order) into a
    retrieval report, ``score`` a report into the number that picks the best epoch; ``elapsed()`` is the run's
    wall time so far; ``on_epoch`` gets each epoch's row once its checkpoint is written; ``feedback``
    (:class:`medsim.train.feedback.FeedbackBatches`) adds voted pairs to every training batch."""
    from ignite.engine import Events
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import (
        CheckpointLoader,
        CheckpointSaver,
        EarlyStopHandler,
        LrScheduleHandler,
        ValidationHandler,
    )

    cfg = config
    start = TRAIN_LAYERS[cfg.train_layers]
    jitter = RandFeatureJitter(cfg.feature_augment).set_random_state(seed=cfg.seed) if start >= POOL4_END else None

    def prepare_train_batch(batchdata, device=None, non_blocking=False, **kwargs):
        x, targets = prepare_batch(batchdata, device, non_blocking)
        if feedback is not None:
            x, targets = feedback.extend(x, targets)
        return (jitter(x) if jitter is not None else x), targets

    g = torch.Generator()
    g.manual_seed(cfg.seed)
    if cfg.source_balance:
        sampler = torch.utils.data.WeightedRandomSampler(
            source_balanced_weights([item["source"] for item in train_ds.data], cfg.source_balance),
            num_samples=len(train_ds), replacement=True, generator=g)
        train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(train_ds) >
                                  cfg.batch_size, num_workers=cfg.workers)
    else:
        train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) >
                                  cfg.batch_size, num_workers=cfg.workers, generator=g)
    val_loader = DataLoader(val_ds, batch_size=128, shuffle=False, num_workers=0)

    tail_params = [p for p in net.tail.parameters() if p.requires_grad]
    head_params = list(net.projection.parameters()) + [net.class_weight, net.class_bias]
    if net.source_head is not None:
        head_params += list(net.source_head.parameters())
    groups = [{"params": head_params, "lr": cfg.head_lr}]
    if tail_params:
        groups.insert(0, {"params": tail_params, "lr": cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule_lambda(cfg.epochs, 1))
    lw = label_weights(label_frequency, cfg.rarity) if cfg.rarity and label_frequency is not None else None
    weights = {**parse_objective(cfg.objective), **({"feedback": cfg.feedback_weight} if feedback is not None else {})}
    loss = RetrievalLoss(weights, cfg.temperature, label_weight=lw,
                         cross_source=cfg.cross_source).to(device)

    epoch_length = min(len(train_loader), int(cfg.max_steps_per_epoch)) if cfg.max_steps_per_epoch else None
    metric = RetrievalMAP(val_idx, report, score, output_transform=lambda o: (o["pred"]["embedding"],
                                                                              o["label"]["index"]))
    evaluator = SupervisedEvaluator(device=device, val_data_loader=val_loader, network=net,
                                    prepare_batch=prepare_batch, key_val_metric={SELECT: metric}, decollate=False,
                                    amp=False)
    trainer = SupervisedTrainer(
        device=device, max_epochs=cfg.epochs, train_data_loader=train_loader, network=net, optimizer=optimizer,
        loss_function=loss, prepare_batch=prepare_train_batch, decollate=False, epoch_length=epoch_length,
        amp=device.type == "cuda",
    )
    for engine in (trainer, evaluator):
        engine.logger.setLevel(logging.WARNING)
    if cfg.select == "last":  # a fixed schedule: each epoch outranks the one before, so the last one is kept
        metric.score = lambda _report: float(trainer.state.epoch)

    with warnings.catch_warnings():  # MONAI passes ignite's deprecated min_delta/cumulative_delta names
        warnings.simplefilter("ignore", DeprecationWarning)
        early = EarlyStopHandler(patience=cfg.patience, score_function=lambda e: e.state.metrics[SELECT],
                                 trainer=trainer, min_delta=1e-4, epoch_level=True)
    best_saver = CheckpointSaver(save_dir=str(folder.path), save_dict={"network": net}, save_key_metric=True,
                                 key_metric_name=SELECT, key_metric_n_saved=1,
                                 key_metric_filename=folder.best_checkpoint.name, key_metric_save_state=True)
    resumable = {"trainer": trainer, "network": net, "optimizer": optimizer, "lr_scheduler": scheduler,
                 "early_stop": early._handler}
    last_saver = CheckpointSaver(save_dir=str(folder.path), save_dict=resumable, save_interval=1, n_saved=1,
                                 epoch_level=True, file_prefix=LAST_CHECKPOINT_PREFIX)

    history: list[dict] = []
    if resume:
        last = folder.latest_checkpoint()
        if last is None:
            say("no checkpoint to resume from yet: starting from epoch 1")
        else:
            epoch = folder.finished_epochs()
            CheckpointLoader(load_path=str(last), load_dict=resumable, map_location=device).attach(trainer)
            if folder.best_checkpoint.is_file():
                best_saver.load_state_dict(torch.load(folder.best_checkpoint, map_location="cpu",
                                                      weights_only=True)["checkpointer"])
            history = folder.read_history(up_to_epoch=epoch)
            say(f"resuming {folder.path} after epoch {epoch} of {cfg.epochs}")

    # order matters: validate, then record / stop / checkpoint with the new numbers
    ValidationHandler(interval=1, validator=evaluator, epoch_level=True).attach(trainer)
    best_saver.attach(evaluator)
    early.attach(evaluator)
    LrScheduleHandler(lr_scheduler=scheduler, print_lr=False, epoch_level=True).attach(trainer)

    totals = {"loss_sum": 0.0, "steps": 0, "t0": time.perf_counter(), "parts": {}}  # of the current epoch

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch_started(engine):
        totals.update(loss_sum=0.0, steps=0, t0=time.perf_counter(), parts={},
                      lr=[group["lr"] for group in optimizer.param_groups])

    @trainer.on(Events.ITERATION_COMPLETED)
    def _iteration(engine):
        totals["loss_sum"] += float(engine.state.output["loss"].detach())
        totals["steps"] += 1
        for k, v in loss.last.items():
            totals["parts"][k] = totals["parts"].get(k, 0.0) + v

    @trainer.on(Events.EPOCH_COMPLETED)
    def _record(engine):
        h = headline(metric.last_report)
        steps = max(1, totals["steps"])
        row = {"epoch": engine.state.epoch, "loss": totals["loss_sum"] / steps,
               "loss_parts": {k: v / steps for k, v in totals["parts"].items()},
               "select": evaluator.state.metrics[SELECT], f"val_mAP@{K}": h[f"mAP@{K}"],
               f"val_nih_mAP@{K}": h[f"nih_mAP@{K}"], "val_break_even_precision": h["break_even_precision"],
               f"val_finding_mAP@{K}": h[f"finding_mAP@{K}"], "val_same_source_cross": h["same_source_cross"],
               "val_by_source": {s: r.get(f"mAP@{K}") for s, r in metric.last_report.get("by_source", {}).items()},
               "lr": totals["lr"], "seconds": time.perf_counter() - totals["t0"]}
        history.append(row)
        best = max(history, key=lambda r: (r["select"], -r["epoch"]))
        kept = "keeping the last" if cfg.select == "last" else f"best {best['select']:.3f} (epoch {best['epoch']})"
        folder.write_history(history)
        folder.update(last_epoch=engine.state.epoch, wall_seconds=elapsed())
        say(f"epoch {row['epoch']:>2}/{cfg.epochs}  loss {row['loss']:.4f}  val mAP@{K} {fmt(row[f'val_mAP@{K}'])}  "
            f"NIH {fmt(row[f'val_nih_mAP@{K}'])}  per-finding {fmt(row[f'val_finding_mAP@{K}'])}  "
            f"break-even P {fmt(row['val_break_even_precision'])}  {kept}  {row['seconds']:.0f} s")

    last_saver.attach(trainer)  # after _record: the checkpoint holds the early-stopping state of this epoch

    if on_epoch is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: on_epoch(history[-1]))

    if resume and folder.latest_checkpoint() is not None and folder.finished_epochs() >= cfg.epochs:
        say("the run had already finished its epochs: writing the bundle from its best checkpoint")
    else:
        say(f"training {cfg.train_layers if start < FEATURES_END else 'the projection head only'} (+ projection "
            f"{cfg.embedding_dim}-d, objective {cfg.objective}) for up to {cfg.epochs} epochs of "
            f"{epoch_length or len(train_loader)} steps on {device}")
        trainer.run()
    return history
