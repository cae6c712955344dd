# Every target installs (or reuses) the ComfyUI runtime first; see scripts/install_runtime.sh.
RUNTIME = eval "$$(bash scripts/install_runtime.sh)"

.PHONY: test test-unit test-graph test-server test-browser demo check bench runtime world bench-world

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
	@$(RUNTIME) && "$$PYTHON" scripts/demo.py $(ARGS)

check:
	@$(RUNTIME) && "$$PYTHON" -m ruff format --check . && "$$PYTHON" -m ruff check .

bench:
	@$(RUNTIME) && for f in benchmarks/bench_*.py; do [ $$f = benchmarks/bench_world.py ] || "$$PYTHON" $$f || exit 1; done

# the small world: the miniature SD1.x world model and its ten concepts (cached outside the repository; see the
# README's Benchmarks for how long), then the benchmark that measures the paper's claims in it
world:
	@$(RUNTIME) && "$$PYTHON" scripts/train_world_model.py && "$$PYTHON" benchmarks/bench_world.py --train-only

bench-world: world
	@$(RUNTIME) && "$$PYTHON" benchmarks/bench_world.py
