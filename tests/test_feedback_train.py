"""`medsim train --feedback`: votes cast on an index built from a folder of real chest X-rays (../shared/data/cxr),
exported with `medsim feedback export`, become training pairs of that folder's images (votes on images that are not
training images are reported and skipped), and a tiny training run adds their loss term."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from medsim.cli import main
from medsim.feedback import FeedbackStore
from medsim.index import CaseIndex
from medsim.train.feedback import MARGIN, feedback_loss

from conftest import SHARED_CXR

pytestmark = pytest.mark.train
FAST = ["--epochs", "2", "--batch-size", "6", "--max-steps-per-epoch", "2", "--validation-fraction", "0.3",
        "--no-progress", "--no-int8-check"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """14 real radiographs of 14 patients from three sources (copied to a temporary folder) and their labels."""
    with open(SHARED_CXR / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen, patients = [], set()
    for source, n in (("nih", 6), ("kermany", 5), ("hannover", 3)):
        for r in rows:
            if sum(c["source"] == source for c in chosen) < n and r["source"] == source \
                    and r["patient_id"] not in patients:
                chosen.append(r)
                patients.add(r["patient_id"])
    root = tmp_path_factory.mktemp("feedback-cxr")
    (root / "images").mkdir()
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in chosen:
            name = f"images/{r['source']}_{Path(r['path']).name}"
            shutil.copy(SHARED_CXR / r["path"], root / name)
            writer.writerow({**r, "path": name})
    return root


def test_votes_become_training_pairs_and_a_tiny_run_uses_them(folder, bundle, tmp_path, capsys):
    from medsim.build import build_index
    from medsim.ingest import LabelTable

    index = tmp_path / "index"
    build_index(folder, index, bundle, labels=LabelTable.from_csv(folder / "labels.csv"), workers=0, batch_size=8,
                progress=False)
    with CaseIndex.open(index) as opened:
        cases = sorted(opened.cases(), key=lambda c: c.source_path)
        fingerprint = opened.model_fingerprint
    assert len(cases) == 14
    store = FeedbackStore(index)
    votes = 0
    for i, query in enumerate(cases):  # every case votes on the next two: 28 votes over 14 images
        for j, direction in ((1, "up"), (2, "down")):
            store.vote(user="dr-a", query_sop_uid=query.sop_uid, hit_sop_uid=cases[(i + j) % 14].sop_uid,
                       vote=direction, score=0.5, model_fingerprint=fingerprint)
            votes += 1
    store.vote(user="dr-a", query_sop_uid=cases[0].sop_uid, hit_sop_uid="1.2.826.0.1.3680043.9.99", vote="up",
               score=0.5, model_fingerprint=fingerprint)  # an image that is not in the training folder
    votes_csv = tmp_path / "votes.csv"
    assert main(["feedback", "export", str(index), "--out", str(votes_csv)]) == 0
    capsys.readouterr()

    report = tmp_path / "report.json"
    code = main(["train", "--images", str(folder), "--labels", str(folder / "labels.csv"), "--out",
                 str(tmp_path / "bundle"), *FAST, "--feedback", str(votes_csv), "--report", str(report)])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("feedback votes.csv"))
    numbers = [int(word) for word in line.replace("(", " ").replace(",", " ").replace(";", " ").split()
               if word.isdigit()]
    total, pairs, up, down, unknown, in_validation = numbers
    assert total == votes + 1 and unknown == 1
    assert pairs == up + down and pairs + in_validation == votes and pairs > 0 and up > 0 and down > 0
    history = json.loads(report.read_text())["history"]
    assert len(history) == 2
    for row in history:
        assert row["loss_parts"]["feedback"] > 0  # the voted pairs are in every batch and scored


def test_feedback_loss_pulls_liked_pairs_together_and_pushes_disliked_ones_apart():
    torch.manual_seed(0)
    raw = torch.randn(4, 16, requires_grad=True)
    pairs = torch.tensor([[0, 1, 1], [2, 3, -1]])
    with torch.no_grad():  # the disliked pair starts above the margin
        raw[3] = raw[2] + 0.1 * raw[3]
    emb = torch.nn.functional.normalize(raw, dim=1)
    cos = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(1).detach()
    assert cos[1] > MARGIN
    feedback_loss(emb, pairs).backward()
    with torch.no_grad():
        moved = torch.nn.functional.normalize(raw - 0.5 * raw.grad, dim=1)
        after = (moved[pairs[:, 0]] * moved[pairs[:, 1]]).sum(1)
    assert after[0] > cos[0] and after[1] < cos[1]
    assert float(feedback_loss(emb, pairs[:0]).detach()) == 0.0
