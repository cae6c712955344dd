# Every target installs (or reuses) the ComfyUI runtime first; see scripts/install_runtime.sh.
RUNTIME = eval "$$(bash scripts/install_runtime.sh)"

.PHONY: test demo check bench runtime

runtime:
	@$(RUNTIME) && echo "ComfyUI: $$COMFYUI_DIR  python: $$PYTHON"

test:
	@$(RUNTIME) && bash scripts/install_browser.sh && "$$PYTHON" -m pytest

demo:
	@$(RUNTIME) && "$$PYTHON" scripts/demo.py

check:
	@$(RUNTIME) && "$$PYTHON" -m ruff format --check . && "$$PYTHON" -m ruff check .

bench:
	@$(RUNTIME) && for f in benchmarks/bench_*.py; do "$$PYTHON" $$f || exit 1; done
