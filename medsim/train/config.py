"""The settings of a training run (``medsim train`` options), its result, and its error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from medsim.errors import MedsimError

FEATURES_END = 30  # vgg16().features[:30]: up to conv5_3 + ReLU, the embedding layer
# --train-layers: the first trainable module of vgg16().features
TRAIN_LAYERS = {"all": 0, "conv5_1": 24, "conv5_2": 26, "conv5_3": 28, "none": 30}
# --objective: the loss terms (medsim.train.objectives implements them)
OBJECTIVES = ("bce", "supcon", "ms", "adv")
# --select: which validation figure picks the epoch that goes into the bundle (medsim.train.validation), or
# "last": none does -- a fixed schedule keeps its last epoch and never stops early
SELECTIONS = ("all", "nih", "mean", "finding", "last")


class TrainError(MedsimError):
    """Training cannot start or continue."""


@dataclass
class TrainConfig:
    images: str
    labels: str
    out: str
    work_dir: str | None = None
    name: str = "vgg16-cxr-finetuned"
    objective: str = "bce+supcon"
    train_layers: str = "conv5_3"
    pooling: str = "gap"
    image_size: int | None = None  # side of the square model input (None: the starting bundle's, 224)
    embedding_dim: int = 512
    epochs: int = 12
    patience: int = 4
    batch_size: int = 64
    lr: float = 1e-4  # trainable VGG-16 layers
    head_lr: float = 1e-3  # projection and classifier
    weight_decay: float = 1e-4
    temperature: float = 0.1
    views: int = 1  # augmented views per training image, besides the original
    int8_check: bool = True  # write int8 calibration images and check int8 against fp32 on the validation split
    feature_augment: float = 0.5  # probability of a random shift/scale of the activation grid
    validation_fraction: float = 0.2
    seed: int = 0
    select: str = "all"  # one of SELECTIONS
    rarity: float = 0.5  # label weights of bce and supcon: frequency ** -rarity (0: every label alike)
    cross_source: float = 4.0  # supcon: weight of a positive from another source family (1: like any other)
    source_balance: float = 0.0  # sampling weight of an image: (images of its source family) ** -source_balance
    adversary: float = 1.0  # gradient-reversal strength of the source head ("adv" objective)
    leave_out: list = field(default_factory=list)  # "source=NAME" / "label=NAME": training images not trained on
    train_on: list = field(default_factory=list)  # "source=NAME" / "label=NAME": train only on matching images
    init: str | None = None  # start from this bundle instead of ImageNet (its vocabulary must map)
    label_map: dict = field(default_factory=dict)
    device: str = "cpu"
    workers: int = 0
    max_steps_per_epoch: int | None = None  # tests and smoke runs
    feedback: str | None = None  # relevance votes (`medsim feedback export` CSV) as extra pairs (medsim.train.feedback)
    feedback_weight: float = 1.0  # weight of the feedback term

    # what must match for --resume (the rest may change: out, epochs, device, ...)
    RESUME_KEYS = ("objective", "train_layers", "pooling", "embedding_dim", "batch_size", "lr", "head_lr",
                   "weight_decay", "temperature", "views", "feature_augment", "validation_fraction", "seed",
                   "select", "init", "rarity", "cross_source", "source_balance", "adversary", "feedback",
                   "feedback_weight", "leave_out", "train_on", "image_size")

    # what a run recorded before a setting existed was trained with (--resume compares against these)
    LEGACY: ClassVar[dict] = {"rarity": 0.0, "cross_source": 1.0, "source_balance": 0.0, "adversary": 1.0,
                              "feedback": None, "feedback_weight": 1.0, "leave_out": [], "train_on": [],
                              "image_size": None}

    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in self.RESUME_KEYS + ("epochs", "patience", "max_steps_per_epoch")}


@dataclass
class TrainResult:
    bundle_path: str
    fingerprint: str
    best_epoch: int
    epochs_run: int
    validation: dict
    baseline: dict
    wall_seconds: float
    run_dir: str
    history: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
