# lobevol: two commands on a fresh machine.
#   make run   installs (into .venv) and runs the DICOM node on its embedded default (config.ini)
#   make run-orthanc  the same analysis inside Orthanc (its Python plugin), on loopback, database in var/orthanc
#   make test  installs (into .venv, plus the DICOM peers via apt when root) and runs the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Ports: make run-orthanc ORTHANC_HTTP_PORT=18042 ORTHANC_DICOM_PORT=14242; make demo DEMO_PORT=11112
# (0: a free one).
ORTHANC_HTTP_PORT ?= 8042
ORTHANC_DICOM_PORT ?= 4242
DEMO_PORT ?= 0
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-python orthanc-dicomweb poppler-utils chromium \
		libpixelmed-java default-jre-headless postgresql

.PHONY: browser-deps install install-peers run run-orthanc demo demo-segment lint test test-fast bench bench-node bench-receive bench-workers clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels.
$(VENV)/.installed: $(PY) setup.cfg pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The integration tests talk to real peers; install them when we can (root, apt).
install-peers:
	@missing=""; for t in storescu storescp echoscu dciodvfy dsrdump dsr2html Orthanc pdftoppm chromium java; do \
	  command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	[ -f /usr/share/orthanc/plugins/libOrthancPython.so ] || missing="$$missing orthanc-python"; \
	[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	[ -f /usr/share/java/pixelmed.jar ] || missing="$$missing libpixelmed-java"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing DICOM peers (missing:$$missing)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); fi; \
	fi

run: install
	$(VENV)/bin/lobevol serve --config config.ini

# Orthanc (apt: orthanc, orthanc-python) with lobevol as its Python plugin; prints the URL.
run-orthanc: install install-peers
	$(VENV)/bin/lobevol orthanc --config config.ini --http-port $(ORTHANC_HTTP_PORT) --dicom-port $(ORTHANC_DICOM_PORT)

# The node's whole loop on loopback (node + DCMTK storescp as PACS + a phantom study).
demo: install
	$(VENV)/bin/lobevol demo --config config.ini --port $(DEMO_PORT)

# The engine alone: phantom -> segmentation -> volumes next to the truth.
demo-segment: install
	$(VENV)/bin/lobevol run

# The browser test's tools (tests/test_viewer_ohif.py): playwright-core from the lock file,
# and the prebuilt OHIF Viewer (npm package @ohif/app, its dist/ only).
# Node.js >= 20 (playwright-core's requirement): Debian's nodejs and npm only when node is
# missing, since a NodeSource nodejs (which carries npm) conflicts with Debian's npm package.
browser-deps: install-peers
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq nodejs npm; else sudo apt-get install -y -qq nodejs npm; fi; }
	@node -e 'if (+process.versions.node.split(".")[0] < 20) { console.error("Node.js " + process.version + " is too old for playwright-core: install Node.js 20 or later"); process.exit(1); }'
	cd tests/browser && npm ci --no-audit --no-fund && ./fetch-ohif.sh

# Two workers, each test file in one of them, so module fixtures are built once (times in the
# README). TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: install install-peers browser-deps
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow and not integration" tests

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) benchmarks/predict_speed.py

bench-node: install install-peers
	$(PY) benchmarks/node_roundtrip.py

# Receive speed: storescu -> storescp, Orthanc and lobevol serve, side by side in one run.
bench-receive: install install-peers
	$(PY) benchmarks/receive.py

# Studies per minute with 1, 2 and 4 lobevol workers on a shared PostgreSQL, the SQLite node beside them.
bench-workers: install install-peers
	$(PY) benchmarks/workers.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
