"""`medsim train` on a handful of real chest X-rays from ../shared/data/cxr (few steps): the bundle it writes loads
and indexes, an interrupted run resumes, and a bundle refuses labels its vocabulary cannot map. Also the split,
vocabulary mapping and losses on their own."""

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medsim.cli import main
from medsim.model import ModelBundle, resolve_bundle
from medsim.train.data import (
    SplitSet,
    TrainDataError,
    TrainRecord,
    TrainSet,
    VocabularyError,
    load_train_set,
    map_vocabulary,
    normalise_label,
    parse_label_map,
    patient_split,
)
from medsim.train.objectives import _pair_masks, multi_similarity_loss, parse_objective, supcon_loss
from medsim.train.run import TrainConfig, Trainer, TrainError, decode_tensor

from conftest import SHARED_CXR

pytestmark = pytest.mark.train
# 18 images of 17 patients from four sources: NIH (two images of one patient), NIH 64 px, Kermany, Hannover.
PICK = {"nih": 7, "nih64": 3, "kermany": 5, "hannover": 3}
FAST = ["--epochs", "2", "--batch-size", "6", "--max-steps-per-epoch", "2", "--validation-fraction", "0.3",
        "--no-progress"]


def _rows():
    with open(SHARED_CXR / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A labeled folder of real radiographs (copied to a temporary folder, never into the repository)."""
    assert (SHARED_CXR / "labels.csv").is_file(), f"no real chest X-rays under {SHARED_CXR}"
    rows = _rows()
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    chosen = []
    two = next(rs for p, rs in sorted(by_patient.items()) if len(rs) >= 2 and rs[0]["source"] == "nih")
    chosen += two[:2]
    for source, n in PICK.items():
        have = sum(r["source"] == source for r in chosen)
        pool = [r for r in rows if r["source"] == source and r not in chosen
                and r["patient_id"] not in {c["patient_id"] for c in chosen}]
        chosen += pool[: n - have]
    root = tmp_path_factory.mktemp("tiny-cxr")
    (root / "images").mkdir()
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in chosen:
            name = f"images/{r['source']}_{Path(r['path']).name}"
            shutil.copy(SHARED_CXR / r["path"], root / name)
            writer.writerow({**r, "path": name})
    return root


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "cxr-vgg16"
    code = main(["train", "--images", str(tiny), "--labels", str(tiny / "labels.csv"), "--out", str(out), *FAST])
    assert code == 0
    return out


def test_tiny_training_run_writes_a_loadable_bundle(trained, tiny):
    bundle = ModelBundle.load(trained)
    assert resolve_bundle(str(trained)).fingerprint == bundle.fingerprint
    train_set = load_train_set(tiny, tiny / "labels.csv")
    assert list(bundle.label_vocabulary) == train_set.vocabulary
    assert bundle.embedding_dim == 512 and bundle.network_config["projection"]["out_dim"] == 512
    assert bundle.preprocess == resolve_bundle("imagenet").preprocess  # what training used

    extra = bundle.extra
    split = extra["split"]
    val, tr = set(split["validation_patients"]), set(split["train_patients"])
    assert val and tr and not val & tr
    assert val | tr == {r.patient_id for r in train_set.records}
    assert extra["data"]["fingerprint"] == train_set.fingerprint()
    assert extra["training"]["hyperparameters"]["objective"] == "bce+supcon"
    assert 1 <= extra["training"]["epochs_run"] <= 2
    assert 0.0 <= extra["validation"]["model"]["mAP@10"] <= 1.0
    assert "break_even" in extra["validation"]["model"] and "mAP@10" in extra["validation"]["baseline"]
    assert extra["code_version"]["medsim"]
    assert extra["consistency_check"]["min_cosine_bundle_vs_training_path"] > 0.99
    weight = decode_tensor(extra["classifier"]["weight"])
    assert weight.shape == (len(bundle.label_vocabulary), 512)

    # the fine-tuned weights differ from ImageNet in conv5_3 only; the earlier layers are ImageNet's
    imagenet = resolve_bundle("imagenet").state_dict()
    state = bundle.state_dict()
    assert torch.equal(state["features.0.weight"], imagenet["features.0.weight"])
    assert torch.equal(state["features.26.weight"], imagenet["features.26.weight"])
    assert not torch.equal(state["features.28.weight"], imagenet["features.28.weight"])

    vectors = bundle.embedder().embed([np.random.default_rng(0).random((300, 260), dtype=np.float32)])
    assert vectors.shape == (1, 512) and abs(float(np.linalg.norm(vectors)) - 1.0) < 1e-5


def test_a_larger_input_is_trained_for_and_carried_by_the_bundle(tiny, tmp_path, capsys):
    """--image-size: the bundle letterboxes to the size it was trained at (build-index embeds as training did: the
    export's consistency check), and sizes VGG-16 cannot pool evenly are refused with one line."""
    out = tmp_path / "b288"
    args = ["train", "--images", str(tiny), "--labels", str(tiny / "labels.csv"), *FAST, "--epochs", "1",
            "--no-int8-check"]
    assert main([*args, "--out", str(out), "--image-size", "288"]) == 0
    bundle = ModelBundle.load(out)
    assert bundle.preprocess.image_size == 288
    assert bundle.preprocess == dataclasses.replace(resolve_bundle("imagenet").preprocess, image_size=288)
    assert bundle.extra["consistency_check"]["min_cosine_bundle_vs_training_path"] > 0.99
    assert bundle.extra["training"]["hyperparameters"]["image_size"] == 288
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b300"), "--image-size", "300"]) == 2
    assert "--image-size 300: use a multiple of 16" in capsys.readouterr().err


def test_the_bundle_carries_int8_calibration_and_its_check(trained, tiny):
    """Training writes int8 calibration images (training images only) and checks int8 against float32 on the
    validation split; int8 is the bundle's default only where that check passed, and it agrees with float32 on
    real radiographs. A bundle without calibration (ImageNet) refuses int8 with a reason."""
    from medsim.ingest import read_any
    from medsim.model.embedder import default_embed_mode
    from medsim.model.quantize import CALIBRATION_FILE, MAX_MAP_LOSS

    bundle = ModelBundle.load(trained)
    check = bundle.extra["int8"]
    calibration = bundle.int8_calibration()
    with open(tiny / "labels.csv", newline="") as f:
        validation = set(bundle.extra["split"]["validation_patients"])
        n_validation = sum(row["patient_id"] in validation for row in csv.DictReader(f))
    assert (trained / CALIBRATION_FILE).is_file()
    assert check["calibration_images"] == len(calibration.pixels) == 18 - n_validation
    assert calibration.pixels.shape[1:] == (224, 224) and calibration.pixels.dtype == np.uint8
    assert check["validation_images"] == n_validation
    assert check["default_ok"] == (check["delta_mAP@10"] >= -MAX_MAP_LOSS)
    assert bundle.embedder().mode == default_embed_mode("cpu", check["default_ok"])

    images = [read_any(p).pixels for p in sorted((tiny / "images").iterdir())[:4]]
    fp32 = bundle.embedder(mode="fp32").embed(images)
    int8 = bundle.embedder(mode="int8")
    assert int8.mode == "int8" and "int8" in int8.describe()
    assert float(np.min(np.sum(fp32 * int8.embed(images), axis=1))) > 0.98
    with pytest.raises(ValueError, match="no int8 calibration"):
        resolve_bundle("imagenet").embedder(mode="int8")


def test_build_index_accepts_the_bundle(trained, tiny, tmp_path, capsys):
    index = tmp_path / "index"
    assert main(["build-index", str(tiny), "--labels", str(tiny / "labels.csv"), "--index", str(index),
                 "--model", str(trained), "--workers", "0", "--no-progress"]) == 0
    from medsim.index import CaseIndex

    with CaseIndex.open(index) as opened:
        stats = opened.stats()
    assert stats["model"]["fingerprint"] == ModelBundle.load(trained).fingerprint
    assert stats["cases"] == 18


def test_an_existing_run_or_bundle_is_not_overwritten_silently(trained, tiny, capsys):
    args = ["train", "--images", str(tiny), "--labels", str(tiny / "labels.csv"), "--out", str(trained), *FAST]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--restart"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_resume_continues_an_interrupted_run(tiny, tmp_path):
    out = tmp_path / "bundle"
    config = TrainConfig(images=str(tiny), labels=str(tiny / "labels.csv"), out=str(out), epochs=3, batch_size=6,
                         max_steps_per_epoch=2, validation_fraction=0.3, patience=10, int8_check=False)

    def interrupt(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, progress=False, on_epoch=interrupt).run()
    work = tmp_path / ".bundle.train"
    assert (work / "last_checkpoint_epoch=1.pt").is_file() and not out.exists()
    assert [r["epoch"] for r in json.loads((work / "history.json").read_text())] == [1]

    with pytest.raises(TrainError, match="--resume"):
        Trainer(config, progress=False).run()
    changed = TrainConfig(**{**config.__dict__, "lr": 1e-3})
    with pytest.raises(TrainError, match="lr="):
        Trainer(changed, resume=True, progress=False).run()

    epochs_seen = []
    result = Trainer(config, resume=True, progress=False, on_epoch=lambda r: epochs_seen.append(r["epoch"])).run()
    assert epochs_seen == [2, 3]
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    bundle = ModelBundle.load(out)
    assert bundle.extra["training"]["epochs_run"] == 3
    # the split is the one the interrupted run drew
    run = json.loads((work / "run.json").read_text())
    assert bundle.extra["split"]["validation_patients"] == run["split"]["validation_patients"]

    # a run recorded before a setting existed used the setting's legacy value (rarity 0: not today's default), so
    # --resume refuses it; make model's --restart-if-changed starts a new run instead
    del run["config"]["rarity"]
    (work / "run.json").write_text(json.dumps(run))
    with pytest.raises(TrainError, match="rarity="):
        Trainer(config, resume=True, overwrite=True, progress=False)._open_run()
    assert Trainer(config, resume=True, overwrite=True, restart_if_changed=True, progress=False)._open_run() is None
    assert not (work / "run.json").exists()


def test_a_bundle_refuses_labels_its_vocabulary_cannot_map(trained, tiny, tmp_path, capsys):
    rows = list(csv.DictReader(open(tiny / "labels.csv", newline="")))
    for r in rows[:3]:
        r["labels"] = "Tuberculosis|" + r["labels"]
    for r in rows[3:6]:
        r["labels"] = "Lung Opacity"
    labels = tiny / "labels-other-vocabulary.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code = main(["train", "--images", str(tiny), "--labels", str(labels), "--out", str(tmp_path / "b"),
                 "--init", str(trained), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot map" in err and "Tuberculosis" in err and "Lung Opacity" in err and "--label-map" in err
    assert not (tmp_path / "b").exists()


def test_two_stage_refinement_keeps_the_split_and_follows_its_starting_bundle(trained, tiny, tmp_path, capsys):
    """make model's second stage: --init the general bundle, --train-on the full-vocabulary NIH sources. Another
    seed does not move a patient across the split; a resumed second stage whose starting bundle was re-trained since
    starts anew (make model) or is refused (--resume alone)."""
    general, out, work = tmp_path / "general", tmp_path / "refined", tmp_path / "refined.train"
    shutil.copytree(trained, general)
    args = ["train", "--images", str(tiny), "--labels", str(tiny / "labels.csv"), "--out", str(out), "--work-dir",
            str(work), "--init", str(general), "--train-on", "source=nih", "--train-on", "source=nih64",
            "--seed", "7", *FAST, "--epochs", "1", "--no-int8-check"]
    assert main(args) == 0
    said = "".join(capsys.readouterr())
    assert "--train-on source=nih, source=nih64: training on" in said and "keep their side" in said
    first, refined = ModelBundle.load(general), ModelBundle.load(out)
    assert refined.extra["split"]["validation_patients"] == first.extra["split"]["validation_patients"]
    assert refined.extra["split"]["train_patients"] == first.extra["split"]["train_patients"]
    assert json.loads((work / "run.json").read_text())["base_bundle"]["fingerprint"] == first.fingerprint

    # the general bundle is re-trained in place (another seed: other weights), then the second stage is resumed
    assert main(["train", "--images", str(tiny), "--labels", str(tiny / "labels.csv"), "--out", str(general),
                 "--overwrite", "--seed", "3", *FAST, "--epochs", "1", "--no-int8-check"]) == 0
    second = ModelBundle.load(general)
    assert second.fingerprint != first.fingerprint
    capsys.readouterr()
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert f"started from bundle {first.fingerprint}" in capsys.readouterr().err
    assert main([*args, "--resume", "--restart-if-changed", "--overwrite"]) == 0
    assert "started from another bundle" in "".join(capsys.readouterr())
    assert json.loads((work / "run.json").read_text())["base_bundle"]["fingerprint"] == second.fingerprint


def test_select_last_keeps_the_last_epoch_and_never_stops_early(trained, tiny, tmp_path, capsys):
    """make model's second stage has no selection: its last epoch goes into the bundle, and patience stops nothing
    (a validation figure picked its first epoch on some splits, before the per-finding figure rose)."""
    out = tmp_path / "last"
    assert main(["train", "--images", str(tiny), "--labels", str(tiny / "labels.csv"), "--out", str(out), "--init",
                 str(trained), "--select", "last", "--patience", "1", *FAST, "--epochs", "3",
                 "--no-int8-check"]) == 0
    training = ModelBundle.load(out).extra["training"]
    assert (training["epochs_run"], training["best_epoch"], training["selection"]) == (3, 3, "the last epoch")
    assert "keeping the last" in "".join(capsys.readouterr())


def test_make_model_refines_as_the_model_card_measured():
    """The second stage `make model` runs is the `two` experiment of benchmarks/model_card.py, flag for flag: the
    recipe is written in both places (Makefile, the script that measures it), so they must not drift apart."""
    import shlex
    import subprocess

    from benchmarks.model_card import EXPERIMENTS, REFINE

    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-s", "model"], cwd=root, capture_output=True, text=True, check=True).stdout
    line = next(x for x in dry.splitlines() if " train " in x and "--init" in x)  # not the venv's recipe, if due
    first, _, second = line.partition(" && ")
    assert "--init" not in first and "--train-on" not in first
    assert shlex.split(second)[-len(REFINE):] == REFINE
    assert EXPERIMENTS["two"][1] == ["--init", "@default", *REFINE]


def test_vocabulary_mapping():
    vocab = ["COVID-19", "Effusion", "No Finding", "Pleural_Thickening", "Pneumonia"]
    mapping = map_vocabulary(vocab, ["pleural thickening", "Normal", "covid 19", "Pneumonia"])
    assert mapping == {"pleural thickening": "Pleural_Thickening", "Normal": "No Finding", "covid 19": "COVID-19",
                       "Pneumonia": "Pneumonia"}
    assert map_vocabulary(vocab, ["Pleural effusion"], parse_label_map(["Pleural effusion=Effusion"])) == \
        {"Pleural effusion": "Effusion"}
    with pytest.raises(VocabularyError, match="Tuberculosis"):
        map_vocabulary(vocab, ["Tuberculosis", "Pneumonia"])
    assert normalise_label("No_Finding") == normalise_label("no finding") == "nofinding"


def _record(patient, labels, source="nih"):
    return TrainRecord(path=f"/x/{patient}-{labels}", rel_path=f"{patient}-{labels}", sha256=patient,
                       labels=tuple(labels.split("|")), patient_id=patient, source=source)


def test_patient_split_is_seeded_disjoint_and_keeps_patients_together():
    records = [_record(f"nih_{i}", "No Finding" if i % 2 else "Pneumonia", "nih") for i in range(40)]
    records += [_record(f"nih_{i}", "Effusion", "nih64") for i in range(0, 40, 4)]  # same patients, other source
    records += [_record(f"kermany_{i}", "Pneumonia", "kermany") for i in range(30)]
    a, b = patient_split(records, 0.2, seed=3), patient_split(records, 0.2, seed=3)
    assert a == b and patient_split(records, 0.2, seed=4) != a
    assert not set(a.train_patients) & set(a.validation_patients)
    assert len(a.validation_patients) == pytest.approx(0.2 * 70, abs=2)
    tr, va = a.indices(records)
    assert len(tr) + len(va) == len(records)
    val_patients = {records[i].patient_id for i in va}
    assert all(records[i].patient_id not in val_patients for i in tr)  # nih and nih64 images stay together
    assert any(records[i].source == "kermany" for i in va) and any(records[i].source == "nih" for i in va)


def test_leave_out_trains_on_fewer_images_and_validates_on_the_same():
    """--leave-out on the dev set's own labels: RSNA images, or those labelled with its catch-all "Not Normal (no lung
    opacity)", leave training only; the split and the validation queries stay as they were, so runs compare paired."""
    with open(SHARED_CXR / "labels.csv", newline="") as f:
        records = [TrainRecord(path=str(SHARED_CXR / r["path"]), rel_path=r["path"], sha256=r["path"],
                               labels=tuple(r["labels"].split("|")), patient_id=r["patient_id"], source=r["source"])
                   for r in csv.DictReader(f)]
    vocabulary = sorted({label for r in records for label in r.labels})
    data = SplitSet.of(TrainSet(SHARED_CXR, SHARED_CXR / "labels.csv", records, vocabulary), patient_split(records))
    catch_all = "Not Normal (no lung opacity)"
    fewer = data.leaving_out([f"label={catch_all}"])
    assert np.array_equal(fewer.val_idx, data.val_idx) and fewer.split == data.split
    assert set(fewer.train_idx) < set(data.train_idx)
    assert not any(catch_all in records[i].labels for i in fewer.train_idx)
    assert any(catch_all in records[i].labels for i in fewer.val_idx)
    old = data.leaving_out(["source=rsna", "source=nih2"])
    assert {records[i].source for i in old.train_idx} == {records[i].source for i in data.train_idx} - {"rsna", "nih2"}
    assert fewer.label_frequency()[catch_all] == 0.0 < data.label_frequency()[catch_all]
    with pytest.raises(TrainDataError, match="matches no training image; the sources are: .*kermany"):
        data.leaving_out(["source=mimic"])
    with pytest.raises(TrainDataError, match="source=NAME or label=NAME"):
        data.leaving_out(["view=PA"])

    # --train-on, the second stage of the two-stage recipe: only the full-vocabulary NIH images train, validation is
    # the same
    nih = data.training_on(["source=nih", "source=nih2", "source=nih64"])
    assert np.array_equal(nih.val_idx, data.val_idx)
    assert {records[i].source for i in nih.train_idx} == {"nih", "nih2", "nih64"}
    assert set(nih.train_idx) == {i for i in data.train_idx if records[i].source in ("nih", "nih2", "nih64")}
    assert nih.label_frequency()["Nodule"] > data.label_frequency()["Nodule"]
    with pytest.raises(TrainDataError, match="--train-on 'source=mimic' matches no training image"):
        data.training_on(["source=nih", "source=mimic"])


def test_a_refined_model_keeps_its_starting_bundles_split():
    """--init: a patient keeps the side the starting bundle's split gave it, whatever the new seed draws, so a
    refined model is never validated on patients its starting model trained on; patients new to that split keep
    the new draw."""
    records = [TrainRecord(path=f"{p}.png", rel_path=f"{p}.png", sha256=p, labels=(label,), patient_id=p,
                           source="nih") for p, label in zip([f"p{i:02d}" for i in range(40)], "ab" * 20)]
    earlier = patient_split(records[:30], 0.2, seed=0)
    later = patient_split(records, 0.2, seed=1).keeping_sides(earlier)
    assert set(earlier.train_patients) <= set(later.train_patients)
    assert set(earlier.validation_patients) <= set(later.validation_patients)
    new = {r.patient_id for r in records[30:]}
    assert set(later.validation_patients) - set(earlier.validation_patients) == \
        new & set(patient_split(records, 0.2, seed=1).validation_patients)
    assert not set(later.train_patients) & set(later.validation_patients)
    assert set(later.train_patients) | set(later.validation_patients) == {r.patient_id for r in records}


def test_losses_follow_the_retrieval_relevance():
    assert parse_objective("bce+0.5*supcon") == {"bce": 1.0, "supcon": 0.5}
    with pytest.raises(ValueError):
        parse_objective("bce+triplet")
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float32)
    patients = torch.tensor([0, 1, 2, 3])
    good = torch.nn.functional.normalize(torch.tensor([[1, 0.1], [1, -0.1], [0.1, 1], [-0.1, 1]]), dim=1)
    bad = good[[0, 2, 1, 3]]
    for loss in (supcon_loss, multi_similarity_loss):
        assert loss(good, labels, patients) < loss(bad, labels, patients)
    # a same-patient pair is neither positive nor negative (retrieval never shows the query's own patient)
    valid, positive = _pair_masks(labels, torch.tensor([0, 0, 2, 3]))
    assert not valid[0, 1] and not positive[0, 1] and positive[2, 3] and valid[0, 2] and not positive[0, 2]


def test_per_finding_weighting_and_cross_source_positives():
    from medsim.train.loop import source_balanced_weights
    from medsim.train.objectives import label_weights

    # frequency ** -0.5, mean 1: a label 4 times rarer weighs twice as much
    w = label_weights([0.4, 0.1, 0.0], 0.5)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[1] / w[0]) == pytest.approx(2.0)
    assert float(w[2]) == pytest.approx(float(w[1]))  # never seen: as the rarest seen label
    assert torch.allclose(label_weights([0.4, 0.1], 0.0), torch.ones(2))

    # supcon: with uniform weights and no cross-source factor it is the plain loss
    labels = torch.tensor([[1, 0], [1, 0], [1, 1], [0, 1]], dtype=torch.float32)
    patients = torch.tensor([0, 1, 2, 3])
    sources = torch.tensor([0, 0, 1, 1])
    emb = torch.nn.functional.normalize(torch.tensor([[1, 0.2], [1, -0.3], [0.5, 1], [-0.1, 1]]), dim=1)
    single = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float32)
    assert supcon_loss(emb, single, patients, label_weight=torch.ones(2)) == pytest.approx(
        float(supcon_loss(emb, single, patients)))
    # a larger weight on the cross-source positive (anchor 0 <-> image 2) pulls that pair together harder
    near = torch.nn.functional.normalize(torch.tensor([[1, 0.2], [1, -0.3], [1, 0.25], [-0.1, 1]]), dim=1)
    far = torch.nn.functional.normalize(torch.tensor([[1, 0.2], [1, 0.25], [-0.3, 1], [-0.1, 1]]), dim=1)
    gain_plain = supcon_loss(far, labels, patients) - supcon_loss(near, labels, patients)
    gain_cross = (supcon_loss(far, labels, patients, sources=sources, cross_source=4.0)
                  - supcon_loss(near, labels, patients, sources=sources, cross_source=4.0))
    assert gain_cross > gain_plain

    # source-balanced sampling: strength 1 draws every family equally often
    weights = source_balanced_weights([0, 0, 0, 1], 1.0)
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert source_balanced_weights([0, 0, 1], 0.0).tolist() == [1.0, 1.0, 1.0]
