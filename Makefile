# Every target installs (or reuses) the ComfyUI runtime first; see scripts/install_runtime.sh.
RUNTIME = eval "$$(bash scripts/install_runtime.sh)"

.PHONY: test test-unit test-graph test-server test-browser demo check bench runtime

runtime:
	@$(RUNTIME) && echo "ComfyUI: $$COMFYUI_DIR  python: $$PYTHON"

test:
	@$(RUNTIME) && bash scripts/install_browser.sh && "$$PYTHON" -m pytest

# one layer at a time (markers: unit, graph, server, browser)
test-unit test-graph test-server:
	@$(RUNTIME) && "$$PYTHON" -m pytest -m $(subst test-,,$@)

test-browser:
	@$(RUNTIME) && bash scripts/install_browser.sh && "$$PYTHON" -m pytest -m browser

demo:
	@$(RUNTIME) && "$$PYTHON" scripts/demo.py

check:
	@$(RUNTIME) && "$$PYTHON" -m ruff format --check . && "$$PYTHON" -m ruff check .

bench:
	@$(RUNTIME) && for f in benchmarks/bench_*.py; do "$$PYTHON" $$f || exit 1; done
