"""`medsim build-index`: source (folder or DICOMweb URL) -> decoded, preprocessed tensors -> embeddings -> index.

One runner (``_run``) for every source and two executors that spread its work: :class:`LocalExecutor` (the default:
worker processes read and preprocess files while this process embeds batches, so decoding hides behind the model)
and ``medsim.build_ray.RayExecutor`` (a Ray Data pipeline over a cluster; actors embed). Whichever ran the work, this
process's :class:`IndexWriter` applies labels, drops duplicates and commits every batch to the catalog in one
transaction together with the ledger rows of the files it covers, so a run that is killed resumes where it stopped
and a re-run only reads what is new or changed.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from medsim.dicom import ChestPolicy, check_structure, is_dicom_file, read_dicom, read_header
from medsim.dicomweb import (DicomWebClient, InstanceRef, InstanceTooLarge, PacsError, PacsUnavailable,
                             is_dicomweb_url)
from medsim.errors import ReadFailure, SkipFile, short
from medsim.files import process_temp_folder
from medsim.index import Case, CaseIndex, FileRecord
from medsim.ingest import LabelTable, case_attributes, read_any, walk
from medsim.phash import LEGACY_METHOD, PHASH_META_KEY, reduced_method, reduced_perceptual_hash
from medsim.preprocess import PreparedImage, PreprocessSpec, prepare

SAVE_EVERY_SECONDS = 60.0
# Large DICOM images are decoded reduced, to a short side of at least this many times the model input (issue 14;
# read_for_index).
# 4, not the minimum of 2: on the realistic export, resampling to 224 px from a 2x image gave embeddings down
# to cosine 0.9926 against the full decode (mean 0.9983), from 3x 0.9954, from 4x 0.9992 (mean 0.9998); the check
# (>= 0.995 per image) is in tests/test_fullres.py and benchmarks/bench_decode.py --realistic.
REDUCED_MIN_SIDE_FACTOR = 4
MAX_LISTED_DUPLICATES = 20


@dataclass
class Outcome:
    """What a worker made of one file (and, when an executor embeds remotely, its vector)."""

    record: FileRecord
    case: Case | None = None
    image: PreparedImage | None = None
    vector: np.ndarray | None = None


@dataclass
class BuildReport:
    indexed: int = 0
    unchanged: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    failures: list[FileRecord] = field(default_factory=list)
    duplicates: list[FileRecord] = field(default_factory=list)  # skipped by --skip-duplicates (same pixels)
    seconds: float = 0.0
    total_cases: int = 0
    interrupted: bool = False
    embed_mode: str = ""  # Embedder.describe(): numeric mode, device, batch size, threads
    workers: int | None = None  # decoding processes of a local build (default_workers() unless given)

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def summary_lines(self) -> list[str]:
        """The summary, one line each; file names and details with undecodable bytes or control characters are
        shown escaped (printable), so printing it never fails and a name never breaks a line."""
        from medsim.index import printable

        lines = [f"indexed {self.indexed} new image(s); index now holds {self.total_cases} case(s)"]
        if self.unchanged:
            lines.append(f"unchanged since an earlier run (not re-read): {self.unchanged}")
        lines.append(f"skipped {sum(self.skipped.values())}" + _by_reason(self.skipped))
        lines.append(f"failed {sum(self.failed.values())}" + _by_reason(self.failed))
        lines += [f"  FAILED {printable(f.path)}: {printable(f.reason)}: {printable(f.detail)}" for f in self.failures]
        lines += [f"  DUPLICATE {printable(d.path)}: {printable(d.detail)}"
                  for d in self.duplicates[:MAX_LISTED_DUPLICATES]]
        if len(self.duplicates) > MAX_LISTED_DUPLICATES:
            lines.append(f"  ... and {len(self.duplicates) - MAX_LISTED_DUPLICATES} more duplicate(s) "
                         "(all in the index's file ledger and in --report)")
        if self.interrupted:
            lines.append("interrupted: everything above is saved; run the same command again to resume")
        if self.workers:
            lines.append(f"decoding workers: {self.workers}")
        if self.embed_mode:
            lines.append(f"embedding mode: {self.embed_mode}")
        lines.append(f"{self.indexed} images in {self.seconds:.1f} s: {self.images_per_second:.2f} images/s")
        return lines


def _by_reason(counts: Counter) -> str:
    return f" ({', '.join(f'{reason}: {n}' for reason, n in sorted(counts.items()))})" if counts else ""


def process_file(path: str, root: str, policy: ChestPolicy, spec: PreprocessSpec) -> Outcome:
    """Read, classify and preprocess one file. Runs in a worker process; never raises for bad input."""
    file = Path(path)
    try:
        stat = file.stat()
    except OSError as exc:
        return Outcome(FileRecord(path, 0, 0.0, "failed", "unreadable", str(exc)))
    size, mtime = stat.st_size, stat.st_mtime
    try:
        radiograph = read_for_index(file, policy, spec.image_size, root=root)
        image = prepare(radiograph.pixels, spec)
    except SkipFile as exc:
        return Outcome(FileRecord(path, size, mtime, "skipped", exc.reason, exc.detail))
    except ReadFailure as exc:
        return Outcome(FileRecord(path, size, mtime, "failed", exc.reason, exc.detail))
    except MemoryError:
        return Outcome(FileRecord(path, size, mtime, "failed", "too-large", "out of memory while decoding"))
    except Exception as exc:  # a decoder bug must not stop a 100k-file run; it is reported with the path
        return Outcome(FileRecord(path, size, mtime, "failed", "decode-error", short(f"{type(exc).__name__}: {exc}")))
    return Outcome(FileRecord(path, size, mtime, "indexed", sop_uid=radiograph.sop_uid),
                   case_from_radiograph(radiograph, path, image), image)


def read_for_index(path: str | Path, policy: ChestPolicy, image_size: int, root: str | Path | None = None):
    """A file read the way build-index reads it: DICOM at the resolution the model needs (a short side of at least
    REDUCED_MIN_SIDE_FACTOR x the model input, see medsim.dicom), PNG/JPEG whole. Whoever re-reads an indexed file to
    compare it with the catalog (its pixel hash) must read it this way."""
    if is_dicom_file(Path(path)):
        return read_dicom(path, policy, min_side=REDUCED_MIN_SIDE_FACTOR * image_size)
    return read_any(path, root=root, policy=policy)


def case_from_radiograph(radiograph, source_path: str, image: PreparedImage) -> Case:
    """The catalog row of a read file. Its pHash is taken from the prepared model input (``image``, the catalog's
    ``area-<size>`` method, medsim.phash), a quarter of the time of hashing the whole image."""
    return Case(
        sop_uid=radiograph.sop_uid, series_uid=radiograph.series_uid, study_uid=radiograph.study_uid,
        patient_id=radiograph.patient_id, source_path=source_path, view=radiograph.view,
        modality=radiograph.modality, pixel_hash=radiograph.pixel_hash, attributes=case_attributes(radiograph),
        phash=reduced_perceptual_hash(image, radiograph.pixels.shape),
    )


def _process_chunk(paths, root, policy, spec) -> list[Outcome]:
    return [process_file(p, root, policy, spec) for p in paths]


def _init_worker() -> None:
    """One torch thread per decoding process (the cores belong to the embedder), and no MONAI metadata tracking:
    workers only need the arrays (same numbers, a third less preprocessing time)."""
    import torch
    from monai.data import set_track_meta

    torch.set_num_threads(1)
    set_track_meta(False)


def build_index(source: str | Path, index_path: str | Path, bundle, labels: LabelTable | None = None,
                policy: ChestPolicy = ChestPolicy(), workers: int | None = None, batch_size: int = 16,
                progress: bool = True, chunk_size: int = 4, skip_duplicates: bool = False,
                client: DicomWebClient | None = None, executor=None, vector_store: str | None = None
                ) -> BuildReport:
    """Index every new or changed image of ``source`` into ``index_path`` with ``bundle``'s model.

    source: a folder (every file below it), or a DICOMweb URL (every chest radiograph the server lists; ``client``
    overrides the client made for the URL). Both go through the same runner, policy, ledger and writer.
    skip_duplicates: keep exact duplicates (decoded pixels equal to an indexed case's, or to a file read earlier in
    this run) out of the index; each is skipped with reason ``duplicate-pixels`` and listed in the report.
    executor: where the reading and embedding run; default ``LocalExecutor(workers, chunk_size)`` (this machine), or
    ``medsim.build_ray.RayExecutor(address)`` (a Ray cluster; ``workers`` and ``chunk_size`` are then unused).
    vector_store: where a new index keeps its vectors (:func:`medsim.vectors.parse_url`: ``hnswlib``, the default,
    ``milvus://HOST:PORT/COLLECTION``, a milvus-lite ``PATH.db``); an existing index must already use it (else
    IndexFormatError: `medsim rebuild-store` moves an index to another store). None: the index's own, or hnswlib."""
    if is_dicomweb_url(source):
        images = _DicomWebSource(client or DicomWebClient(str(source)), policy)
    else:
        images = _FolderSource(Path(source).resolve(), policy, labels)
    return _run(images, index_path, bundle, labels, executor or LocalExecutor(workers, chunk_size), batch_size,
                progress, skip_duplicates, vector_store=vector_store)


def index_studies(client: DicomWebClient, study_uids, index_path: str | Path, bundle,
                  labels: LabelTable | None = None, policy: ChestPolicy = ChestPolicy(), workers: int = 0,
                  batch_size: int = 16, progress: bool = False, chunk_size: int = 1, skip_duplicates: bool = False,
                  meta: dict | None = None) -> BuildReport:
    """Index the chest radiographs of these studies (StudyInstanceUIDs) of a DICOMweb server: the same runner,
    policy, skip/fail reasons, ledger and writer as :func:`build_index` (``medsim watch`` calls this for the studies
    that arrived). A series that is not a chest radiograph by its QIDO-RS attributes is recorded as skipped, per
    instance, with the policy's reason, without fetching it. ``meta`` (e.g. the watcher's position in the PACS's
    change feed) is stored with the index once every batch is committed, and not when the run was interrupted.
    ``bundle`` may be a :class:`ReusedEmbedder` so a long-running caller loads the model once."""
    images = _StudiesSource(client, policy, list(study_uids))
    return _run(images, index_path, bundle, labels, LocalExecutor(workers, chunk_size), batch_size, progress,
                skip_duplicates, meta=meta)


class ReusedEmbedder:
    """A model bundle whose embedder is made once and reused by every run given it (``medsim watch`` indexes a few
    studies at a time; loading the network for each would dominate). Everything else is the bundle's."""

    def __init__(self, bundle):
        self._bundle = bundle
        self._embedders: dict = {}

    def embedder(self, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in self._embedders:
            self._embedders[key] = self._bundle.embedder(*args, **kwargs)
        return self._embedders[key]

    def __getattr__(self, name):
        return getattr(self._bundle, name)


def _run(images, index_path, bundle, labels, executor, batch_size, progress, skip_duplicates,
         meta: dict | None = None, vector_store: str | None = None) -> BuildReport:
    """The one build loop: list what is new → read/preprocess (and, remotely, embed) on the executor → embed what
    is not yet embedded and commit in batches here."""
    started = time.perf_counter()
    report = BuildReport()
    index = CaseIndex.open_or_create(index_path, model_fingerprint=bundle.fingerprint, model_name=bundle.name,
                                     dim=bundle.embedding_dim, model_path=str(bundle.path), vector_store=vector_store)
    try:
        todo = images.pending(index, report)
        with executor.outcomes(images, todo, bundle, batch_size, report) as outcomes:
            # the workers start and decode while the model loads
            writer = IndexWriter(index, bundle, report, labels, batch_size, skip_duplicates,
                                 embedder=executor.embedder(bundle, batch_size))
            writer.consume(outcomes, len(todo), progress)
        if meta and not report.interrupted:  # after the last batch's commit (medsim watch: its change-feed position)
            index.update_meta(meta)
        report.total_cases = len(index)
    finally:
        index.close()
    report.seconds = time.perf_counter() - started
    return report


class _FolderSource:
    """Every file below a folder; unchanged files (same size and mtime in the ledger) are not re-read."""

    def __init__(self, folder: Path, policy: ChestPolicy, labels: LabelTable | None):
        self.folder, self.policy, self.labels = folder, policy, labels

    def pending(self, index: CaseIndex, report: BuildReport) -> list[str]:
        files, unreadable_dirs = walk(self.folder)
        if self.labels is not None and self.labels.source:  # the labels file may sit inside the export: metadata
            files = [f for f in files if str(f.resolve()) != str(Path(self.labels.source).resolve())]
        failed_dirs = [FileRecord(str(p), 0, 0.0, "failed", "unreadable", why) for p, why in unreadable_dirs]
        index.record_files(failed_dirs)
        for record in failed_dirs:
            report.failed[record.reason] += 1
            report.failures.append(record)
        known = index.known_files()
        todo = []
        for file in files:
            entry = known.get(str(file))
            try:
                stat = file.stat()
            except OSError:
                todo.append(str(file))
                continue
            if entry is not None and entry[0] == stat.st_size and abs(entry[1] - stat.st_mtime) < 1e-6:
                report.unchanged += 1
            else:
                todo.append(str(file))
        return todo

    def task(self, spec: PreprocessSpec):
        """A picklable ``chunk of items -> outcomes`` that runs anywhere the folder is mounted at the same path."""
        return partial(_process_chunk, root=str(self.folder), policy=self.policy, spec=spec)

    def pool(self, workers: int) -> Executor | None:
        return _process_pool(workers) if workers > 0 else None

    def files(self, todo: list[str]) -> list[str]:
        """The local files among ``todo`` (what default_workers() sizes up): all of them."""
        return todo

    def in_flight(self, workers: int) -> int:
        return 2 * workers + 2


class _DicomWebSource:
    """Every chest radiograph a DICOMweb server lists (QIDO-RS), fetched by WADO-RS into a temporary folder, read
    like a file and deleted. Ledger rows and ``source_path`` are the instance's WADO-RS URL, so a re-run retries only
    failures and new instances."""

    def __init__(self, client: DicomWebClient, policy: ChestPolicy):
        reachable, detail = client.ping()
        if not reachable:  # before an index is created for nothing
            raise PacsUnavailable(detail)
        self.client, self.policy = client, policy

    def pending(self, index: CaseIndex, report: BuildReport) -> list[InstanceRef]:
        known = index.known_files()
        todo = []
        for ref in self.client.chest_instances(self.policy):
            entry = known.get(self.client.instance_url(ref.study_uid, ref.series_uid, ref.sop_uid))
            if index.has_sop_uid(ref.sop_uid) or (entry is not None and entry[2] in ("indexed", "skipped")):
                report.unchanged += 1
            else:
                todo.append(ref)
        return todo

    def task(self, spec: PreprocessSpec):
        """A picklable ``chunk of InstanceRefs -> outcomes`` that runs anywhere the server is reachable."""
        return partial(_fetch_chunk, client=self.client, policy=self.policy, spec=spec)

    def pool(self, workers: int) -> Executor:
        # fetching is I/O: without worker processes, threads of this process still overlap the requests
        return _process_pool(workers) if workers > 0 else ThreadPoolExecutor(max_workers=4)

    def files(self, todo: list) -> list:
        """None are local before they are fetched: default_workers() keeps one fewer than the cores."""
        return []

    def in_flight(self, workers: int) -> int:
        return 2 * max(workers, 3) + 2


def fetch_and_process(client: DicomWebClient, ref: InstanceRef, folder: str, policy: ChestPolicy,
                      spec: PreprocessSpec) -> Outcome:
    """Fetch one instance into ``folder``, read and preprocess it, delete the file. Runs in a worker (process or
    thread); never raises for bad input. The ledger row is keyed by the instance's WADO-RS URL and the case's
    ``source_path`` is set to it."""
    url = client.instance_url(ref.study_uid, ref.series_uid, ref.sop_uid)
    try:
        data = client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid)
    except InstanceTooLarge as exc:
        return Outcome(FileRecord(url, 0, 0.0, "failed", "too-large", str(exc)))
    except PacsError as exc:
        return Outcome(FileRecord(url, 0, 0.0, "failed", "unreadable", f"WADO-RS: {exc}"))
    path = Path(folder) / f"{uuid.uuid4().hex}.dcm"
    try:
        path.write_bytes(data)
        outcome = process_file(str(path), folder, policy, spec)
    finally:
        path.unlink(missing_ok=True)
    record = outcome.record
    outcome.record = FileRecord(url, len(data), 0.0, record.status, record.reason, record.detail, record.sop_uid)
    if outcome.case is not None:
        outcome.case.source_path = url
    return outcome


def _fetch_chunk(refs, client, policy, spec) -> list[Outcome]:
    # on the machine that fetches; each file is removed once read, and a killed process's folder by the next one
    folder = str(process_temp_folder("dicomweb"))
    return [fetch_and_process(client, ref, folder, policy, spec) for ref in refs]


class _StudiesSource(_DicomWebSource):
    """The instances of given studies on a DICOMweb server (QIDO-RS per study), fetched and read like
    :class:`_DicomWebSource`'s (same ledger keys: the WADO-RS URL). A series that the policy refuses by its QIDO-RS
    Modality / BodyPartExamined is not fetched: each of its instances is recorded as skipped with the policy's reason
    (so a CT is "skipped: not-chest-radiograph" in the report and the ledger, as in a folder build)."""

    def __init__(self, client: DicomWebClient, policy: ChestPolicy, study_uids: list[str]):
        super().__init__(client, policy)
        self.study_uids = study_uids

    def pending(self, index: CaseIndex, report: BuildReport) -> list[InstanceRef]:
        known = index.known_files()
        todo, refused = [], []
        for ref, skip in _study_instances(self.client, self.study_uids, self.policy):
            url = self.client.instance_url(ref.study_uid, ref.series_uid, ref.sop_uid)
            entry = known.get(url)
            if index.has_sop_uid(ref.sop_uid) or (entry is not None and entry[2] in ("indexed", "skipped")):
                report.unchanged += 1
            elif skip is not None:
                refused.append(FileRecord(url, 0, 0.0, "skipped", skip.reason, f"{skip.detail} (by its QIDO-RS "
                                          "attributes; not fetched)", ref.sop_uid))
            else:
                todo.append(ref)
        index.record_files(refused)
        for record in refused:
            report.skipped[record.reason] += 1
        return todo


def _study_instances(client: DicomWebClient, study_uids, policy: ChestPolicy):
    """(InstanceRef, SkipFile or None) for every instance of the given studies, series by series (QIDO-RS); the
    SkipFile is the policy's verdict on the series' Modality and BodyPartExamined. A study the server no longer holds
    lists nothing."""
    from medsim.dicomweb import BODY_PART, MODALITY, SERIES_UID, SOP_UID, PacsNotFound, _first, is_uid

    for study_uid in study_uids:
        if not is_uid(study_uid):
            continue
        try:
            series_list = client.qido(f"studies/{study_uid}/series", {"includefield": [MODALITY, BODY_PART]})
        except PacsNotFound:
            continue
        for series in series_list:
            series_uid = _first(series, SERIES_UID)
            if not is_uid(series_uid):
                continue
            modality, body_part = _first(series, MODALITY).upper(), _first(series, BODY_PART).upper()
            try:
                policy.check(modality, body_part)
                skip = None
            except SkipFile as exc:
                skip = exc
            try:
                instances = client.search_instances(study_uid, series_uid)
            except PacsNotFound:
                continue
            for instance in instances:
                sop_uid = _first(instance, SOP_UID)
                if is_uid(sop_uid):
                    yield InstanceRef(study_uid, series_uid, sop_uid, modality, body_part), skip


class IndexWriter:
    """The one consumer of outcomes, whatever their source (folder or DICOMweb): applies labels, drops repeated SOP
    Instance UIDs (and, with ``skip_duplicates``, repeated pixels), embeds in batches, and commits each batch with
    the ledger rows of the files it covers in one transaction; saves the graph now and then and at the end."""

    def __init__(self, index: CaseIndex, bundle, report: BuildReport, labels: LabelTable | None = None,
                 batch_size: int = 16, skip_duplicates: bool = False, embedder=None):
        """embedder: embeds the outcomes that arrive without a vector (the local executor's: the bundle's); None
        when every outcome arrives embedded (Ray actors)."""
        self.index, self.bundle, self.report = index, bundle, report
        self.labels = labels or LabelTable.empty()
        self.batch_size, self.skip_duplicates = batch_size, skip_duplicates
        self.embedder = embedder
        if embedder is not None:
            report.embed_mode = embedder.describe()
        self._keep_phash = _catalog_phash_method(index, bundle) == reduced_method(bundle.preprocess.image_size)
        self._seen_uids: set[str] = set()
        self._seen_pixels: dict[str, str] = {}  # pixel hash -> path, of the files queued in this run
        self._pending: list[Outcome] = []
        self._ledger: list[FileRecord] = []
        self._last_save = time.monotonic()

    def consume(self, outcomes, total: int, progress: bool = True) -> None:
        """Handle every outcome with a progress bar; Ctrl-C keeps what is committed and marks the report."""
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="build-index", disable=not progress, dynamic_ncols=True)
        try:
            for outcome in outcomes:
                bar.update(1)
                self.handle(outcome)
                bar.set_postfix(indexed=self.report.indexed, refresh=False)
            self.flush()
        except KeyboardInterrupt:
            self.report.interrupted = True
        finally:
            bar.close()
            self.index.save()

    def handle(self, outcome: Outcome) -> None:
        record, report = outcome.record, self.report
        if record.status == "indexed":
            self.labels.apply(outcome.case)
            if record.sop_uid in self._seen_uids or self.index.has_sop_uid(record.sop_uid):
                record = FileRecord(record.path, record.size, record.mtime, "skipped", "duplicate-sop-uid",
                                    f"SOP Instance UID {record.sop_uid} already indexed", record.sop_uid)
            elif self.skip_duplicates and (original := self._same_pixels(outcome.case)):
                record = FileRecord(record.path, record.size, record.mtime, "skipped", "duplicate-pixels",
                                    f"same pixels as {original}", record.sop_uid)
                report.duplicates.append(record)
            else:
                if not self._keep_phash:  # a catalog of another pHash method: its duplicates scan computes this one
                    outcome.case.phash = ""
                self._seen_uids.add(record.sop_uid)
                if outcome.case.pixel_hash:
                    self._seen_pixels.setdefault(outcome.case.pixel_hash, record.path)
                self._pending.append(outcome)
        if record.status == "skipped":
            report.skipped[record.reason] += 1
            self._ledger.append(record)
        elif record.status == "failed":
            report.failed[record.reason] += 1
            report.failures.append(record)
            self._ledger.append(record)
        if len(self._pending) >= self.batch_size:
            self.flush()
            if time.monotonic() - self._last_save > SAVE_EVERY_SECONDS:
                self.index.save()
                self._last_save = time.monotonic()

    def flush(self) -> None:
        pending, ledger = self._pending, self._ledger
        if not pending and not ledger:
            return
        unembedded = [o for o in pending if o.vector is None]
        if unembedded:
            for outcome, vector in zip(unembedded, self.embedder.embed_prepared([o.image for o in unembedded])):
                outcome.vector = vector
        vectors = (np.stack([o.vector for o in pending]) if pending
                   else np.zeros((0, self.index.dim), dtype=np.float32))
        self.index.add([o.case for o in pending], vectors, self.bundle.fingerprint,
                       files=ledger + [o.record for o in pending])
        self.report.indexed += len(pending)
        self._pending, self._ledger = [], []

    def _same_pixels(self, case: Case) -> str:
        """Where ``case``'s exact pixels were seen before ('' if nowhere): earlier in this run, or an indexed case."""
        if not case.pixel_hash:
            return ""
        if case.pixel_hash in self._seen_pixels:
            return f"{self._seen_pixels[case.pixel_hash]} (earlier in this run)"
        original = self.index.find_pixel_hash(case.pixel_hash)
        return f"indexed SOP {original.sop_uid} ({original.source_path})" if original else ""


def _catalog_phash_method(index: CaseIndex, bundle) -> str:
    """The pHash method of the catalog (medsim.phash): recorded in its meta; a catalog with cases but no record is
    from before issue 14 (``display``); a new one gets the method the workers compute, recorded before its first
    case. One method per catalog, so ``medsim duplicates`` never compares hashes of two methods."""
    method = index.meta.get(PHASH_META_KEY)
    if method:
        return method
    if len(index):
        return LEGACY_METHOD
    method = reduced_method(bundle.preprocess.image_size)
    index.set_meta(PHASH_META_KEY, method)
    return method


# default_workers(): is a source decode-bound? A worker's CPU time per image, estimated from a few files' headers:
# megapixels x the cost per megapixel of its kind, measured here with one worker (read, reduced where the codec
# allows, LUTs, hashes and preprocessing; docs/performance.md, issue 14): the lossless codecs (JPEG Lossless, JPEG-LS,
# JPEG 2000) 42-60 ms per MP, more for small JPEG 2000 files read whole; everything else (uncompressed, RLE, JPEG
# Baseline, PNG/JPEG files) 4-20 ms per MP.
WORKER_SAMPLE_FILES = 8
CODEC_MS_PER_MP = 50.0
OTHER_MS_PER_MP = 15.0
# CPU ms per image of the embedder against which that is weighed: the int8 default (2 threads) took 21-30 here, the
# fastest mode measured, so a slower embedder only makes the choice of all cores err towards an idle worker.
EMBED_CPU_MS = 25.0
_CODEC_SYNTAX_PREFIX = "1.2.840.10008.1.2.4."  # JPEG family; Baseline/Extended (.50/.51) are cheap (DCT scaling)
_CHEAP_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")


def default_workers(sample=(), cores: int | None = None) -> int:
    """Decoding processes for a build over the files ``sample`` (paths; empty: unknown, e.g. a DICOMweb source).

    Normally one fewer than the cores: the model is the bottleneck (a 512-px image costs a worker 3-6 ms of CPU, the
    int8 model ~25 ms) and takes the rest. All cores when decoding is the bottleneck: when the estimated worker CPU
    time per image (the mean over up to WORKER_SAMPLE_FILES files spread over ``sample``, from their headers:
    :func:`estimated_worker_ms`) exceeds what the other cores spend embedding it, (cores - 1) x EMBED_CPU_MS -- on
    two cores that is every full-resolution export (2,000-3,500 px: 30-300 ms per image). Reading the headers costs
    a few ms. At least one, at most eight."""
    cores = cores or os.cpu_count() or 2
    workers = cores - 1
    sample = list(sample)
    if sample and cores > 1:
        step = max(1, len(sample) // WORKER_SAMPLE_FILES)
        estimates = [ms for ms in map(estimated_worker_ms, sample[::step][:WORKER_SAMPLE_FILES]) if ms is not None]
        if estimates and sum(estimates) / len(estimates) > (cores - 1) * EMBED_CPU_MS:
            workers = cores
    return max(1, min(8, workers))


def estimated_worker_ms(path) -> float | None:
    """A worker's CPU ms for one file, estimated from its header (pixels and transfer syntax); None when the file
    is no image that can be sized this way, or one the reader refuses as too large (it is then left out of the
    estimate)."""
    try:
        if is_dicom_file(Path(path)):  # read as the worker reads it: structure walked first (bombs refused), values
            structure = check_structure(path)  # over 1 KB left unread
            header = read_header(Path(path))
            pixels = int(header.Rows) * int(header.Columns)
            syntax = structure.transfer_syntax
            codec = syntax.startswith(_CODEC_SYNTAX_PREFIX) and syntax not in _CHEAP_JPEG
        else:
            from PIL import Image

            with Image.open(path) as image:  # reads the header only
                pixels, codec = image.width * image.height, False
    except Exception:  # not an image, unreadable, no Rows/Columns: the build itself will say why
        return None
    if not 0 < pixels <= ChestPolicy().max_pixels:  # refused as too large before decoding: costs nothing
        return None
    return pixels / 1e6 * (CODEC_MS_PER_MP if codec else OTHER_MS_PER_MP)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """Spawned, not forked: no fork of a process whose torch threads already run."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)


class LocalExecutor:
    """This machine: ``workers`` spawn-started processes read and preprocess chunks of ``chunk_size`` files (0: in
    this process; DICOMweb fetches then overlap in threads) while this process embeds (the writer's embedder)."""

    def __init__(self, workers: int | None = None, chunk_size: int = 4):
        self.workers = None if workers is None else max(0, workers)  # None: default_workers() for the source
        self.chunk_size = chunk_size

    @contextmanager
    def outcomes(self, images, todo: list, bundle, batch_size: int, report: BuildReport):
        """The outcomes of ``todo`` (not embedded), in the order of ``todo``; the workers are stopped on leaving."""
        workers = default_workers(images.files(todo)) if self.workers is None else self.workers
        report.workers = workers
        pooled = Pooled(images.task(bundle.preprocess), _chunks(todo, self.chunk_size), images.pool(workers),
                        images.in_flight(workers))
        try:
            yield pooled
        finally:
            pooled.close()

    def embedder(self, bundle, batch_size: int):
        return bundle.embedder(batch_size=batch_size)


class Pooled:
    """Outcomes of ``task(chunk)`` for every chunk, with at most ``max_in_flight`` chunks queued on ``executor``, or
    in this process when ``executor`` is None; in the chunks' order either way, so the worker count never changes
    which of two files with one SOP UID is indexed (the first listed) or anything else a build decides. The first
    chunks are submitted at construction, so worker processes start and decode while the caller loads its model."""

    def __init__(self, task, chunks, executor: Executor | None, max_in_flight: int):
        self.task, self.executor, self.max_in_flight = task, executor, max(1, max_in_flight)
        self._queue = iter(chunks)
        self._in_flight: deque = deque()
        if executor is not None:
            self._fill()

    def _fill(self) -> None:
        while len(self._in_flight) < self.max_in_flight:
            chunk = next(self._queue, None)
            if chunk is None:
                return
            self._in_flight.append(self.executor.submit(self.task, chunk))

    def __iter__(self):
        if self.executor is None:
            for chunk in self._queue:
                yield from self.task(chunk)
            return
        while True:
            self._fill()
            if not self._in_flight:
                return
            yield from self._in_flight.popleft().result()

    def close(self) -> None:
        """Cancel what has not started and stop the workers (also after Ctrl-C or an error)."""
        if self.executor is not None:
            for future in self._in_flight:
                future.cancel()
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
