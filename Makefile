VENV ?= .venv
PY := $(VENV)/bin/python
MANUAL_DIR ?= $(MNIST_JAX_MANUAL_DIR)

.PHONY: install constraints train test test-slow analyze tensorboard bench bench-quick experiments speedrun clean

install: $(VENV)/.installed

# constraints.txt: the exact versions CI ran (`make constraints` rewrites it from a working .venv).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --progress-bar off --upgrade pip
	$(PY) -m pip install -q --progress-bar off -c constraints.txt -e '.[dev]'
	touch $@

constraints: install
	{ echo '# The exact versions CI ran; make install installs them. Rewrite: make constraints'; $(PY) -m pip freeze --exclude-editable; } > constraints.txt

train: install
	$(PY) -m mnist_jax train $(if $(MANUAL_DIR),--manual-dir $(MANUAL_DIR)) $(ARGS)

test: install
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=5 $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS)

analyze: install
	$(PY) -m mnist_jax analyze --workdir $(or $(WORKDIR),runs/latest) $(ARGS)

# Every run's live curves (runs/*/tb): http://localhost:6006
tensorboard: install
	$(VENV)/bin/tensorboard --logdir $(or $(LOGDIR),runs) $(ARGS)

bench: install
	$(PY) -m mnist_jax.bench $(if $(MANUAL_DIR),--manual-dir $(MANUAL_DIR)) $(ARGS)

bench-quick: install
	$(PY) -m mnist_jax.bench --quick $(if $(MANUAL_DIR),--manual-dir $(MANUAL_DIR)) $(ARGS)

# Every experiment at its --quick size (< 30 min on 2 cores); run a script alone for its full size.
# MNIST comes from $(MNIST_JAX_MANUAL_DIR) when not prepared yet; Fashion-MNIST from Debian's dataset-fashion-mnist.
EXPERIMENTS := padding pooling filter_size batch_size seeds dropout_overfitting improved fashion conv_forms

experiments: install
	@set -e; start=$$(date +%s); for name in $(EXPERIMENTS); do \
		$(PY) experiments/$$name.py --quick $(ARGS); \
	done; echo "make experiments: $$(( $$(date +%s) - start )) s; tables in results/*/table.md"

speedrun: install
	$(PY) experiments/speedrun.py $(ARGS)

clean:
	rm -rf $(VENV) runs results .pytest_cache
