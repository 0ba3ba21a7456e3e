# Set-up and checks. `make run`: bootstrap .venv and run the demo; `make test`: lint + the whole
# suite on the pinned transformers, then again on transformers 5.2 (what kvpress needs).
PYTHON ?= python3
TORCH := torch==2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test lint pytest pytest-tf52 needle-table peers clean

.venv/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv .venv
	.venv/bin/pip install -q $(TORCH)
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
	.venv/bin/pip install -q --no-deps -e .
	touch $@

.venv-tf52/.installed: requirements-tf52.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv .venv-tf52
	.venv-tf52/bin/pip install -q $(TORCH)
	.venv-tf52/bin/pip install -q -r requirements-tf52.txt
	.venv-tf52/bin/pip install -q --no-deps -r requirements-nodeps.txt
	.venv-tf52/bin/pip install -q --no-deps -e .
	touch $@

# kvpress (the main peer) in its own environment: it pins transformers < 5.3.
.venv-peers/.installed: requirements-peers.txt
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install -q $(TORCH)
	.venv-peers/bin/pip install -q -r requirements-peers.txt
	touch $@

peers: .venv-peers/.installed

run: .venv/.installed
	.venv/bin/clusterattn demo

lint: .venv/.installed
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

pytest: .venv/.installed
	.venv/bin/python -m pytest -q

pytest-tf52: .venv-tf52/.installed
	.venv-tf52/bin/python -m pytest -q

test: lint pytest pytest-tf52

# Regenerates the needle table of the README (about 15 minutes on 2 cores).
needle-table: .venv/.installed
	.venv/bin/clusterattn needle --lengths 2048 4096 --samples 10 --budgets 64 128 256 512 --seed 1 --out docs/needle

clean:
	rm -rf .venv .venv-tf52 .venv-peers .pytest_cache
