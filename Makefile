# Two entry points: `make demo` (set up + run the main job's default) and `make test`.
# torch goes in first and alone: it resolves to the CPU wheel on disk here; left to the
# resolver, pip would fetch a multi-GB CUDA build. Everything else is one pip command
# (separate installs break aiobotocore's botocore pin). DS_BUILD_OPS=0: DeepSpeed ops JIT-build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test mini-paper venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	@# The first deepspeed.init_distributed JIT-compiles DeepSpeed's CPU shared-memory comm op (~70 s
	@# on 2 cores, cached under ~/.cache/torch_extensions): build it with the install, not in the first job.
	-$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

# The training job's no-argument default: tiny random-weight Qwen-Image, sklearn digits, 2 CPU workers
# with DeepSpeed ZeRO-2 on local Ray; ends with runs/tiny-digits/final/samples.png (1/2/4 NFE).
demo: $(STAMP)
	$(PY) jobs/train_qwen.py

# Two pytest processes side by side: the Ray tests in one (one Ray), the CPU-only tests beside them (tests/lanes.py).
test: $(STAMP)
	$(PY) tests/lanes.py

clean-venv:
	rm -rf $(VENV)
