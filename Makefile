# Two entry points, both self-contained on a fresh machine (Linux or macOS, with or without a GPU):
#   make demo   set everything up, then run the main job on the embedded benchmark
#   make test   set everything up, then run the test suite
# uv is used when on PATH; otherwise it is installed from PyPI into a private venv (.uv-bootstrap).
UV ?= $(shell command -v uv 2>/dev/null || echo .uv-bootstrap/bin/uv)
export UV_SYSTEM_CERTS ?= 1

.PHONY: demo test setup lint

.uv-bootstrap/bin/uv:
	python3 -m venv .uv-bootstrap && .uv-bootstrap/bin/python -m pip install -q uv

setup: $(UV)
	$(UV) sync --extra test

demo: $(UV)
	$(UV) run hias-nb demo $(ARGS)

test: $(UV)
	$(UV) run --extra test pytest $(ARGS)

lint: $(UV)
	$(UV) run --extra test ruff check .

.PHONY: notebooks

# The notebook series (notebooks/01_* ... 06_*), opened in JupyterLab
notebooks: $(UV)
	$(UV) run jupyter lab notebooks/
