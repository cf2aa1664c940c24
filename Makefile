# Two commands get a newcomer from clone to metrics: `make repro` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# dvc.yaml commands call `python`: make it the project's interpreter.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# `cpu` installs onnxruntime; GPU users run `make install EXTRAS=gpu` after installing CUDA torch.
EXTRAS ?= cpu

.PHONY: install install-dev repro test test-fast test-portable bench constraints

# constraints.txt: every package's version as in the venv that made the committed dvc.lock, so a
# fresh clone installs the same libraries (torch apart: pinned here, CPU or CUDA build alike).
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# The test tools (pytest, ruff, Playwright, moto, dvc-s3): `make test` adds them, `make repro` runs
# without them (`make install-dev` took 16 s after it on a Zen 4; docs/machines.md). Only `dev`
# here: the runtime extra stays whichever `make install` chose (cpu or gpu, never both).
$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# After changing pyproject.toml's dependencies, or `.venv/bin/pip install -U NAME` on purpose:
# install without the old pins (pip moves only what the new ranges need), then rewrite the pins
# from the venv (then `dvc repro`, and commit pyproject.toml, constraints.txt and dvc.lock).
constraints:
	test -x $(BIN)/python || { echo "no $(VENV): run make install first"; exit 1; }
	$(BIN)/pip install -q -e ".[$(EXTRAS),dev]"
	{ sed -n '1,/^# --- pins/p' constraints.txt; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -i '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(BIN)/.installed $(BIN)/.installed-dev

install: $(BIN)/.installed

install-dev: $(BIN)/.installed-dev

repro: install
	$(BIN)/dvc pull --allow-missing
	$(BIN)/dvc repro

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# Day-to-day lane: everything but the tests that drive real `dvc` runs or several training
# processes (CI runs them all).
test-fast: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -m "not e2e and not slow and not browser"

# The kernel-dependent tests (marker `kernels`) as a CPU with AVX2 only (no AVX-512, VNNI or bf16)
# computes them, from any x86-64 machine: PyTorch and oneDNN pinned to AVX2, the whole process
# emulated as a Haswell by QEMU (Debian's qemu-user) so that ONNX Runtime takes its AVX2 kernels,
# on one core so that the int8 probes stay in the emulated process. About 15-20x slower.
# NPY_DISABLE_CPU_FEATURES: numpy's own AVX2 sort kernels crash QEMU 7.2's emulator (a segfault in
# argpartition); numpy then sorts with its x86-64-v2 code, while its BLAS (OpenBLAS's Haswell
# kernels), PyTorch and ONNX Runtime keep their AVX2 kernels.
test-portable: install-dev
	command -v qemu-x86_64 >/dev/null || { echo "needs qemu-x86_64: apt-get install qemu-user"; exit 1; }
	NPY_DISABLE_CPU_FEATURES=X86_V3 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
		taskset -c 0 qemu-x86_64 -cpu Haswell \
		$(BIN)/python -m pytest -q -m kernels -p no:cacheprovider -n 0

bench: install
	$(BIN)/python -m bench.bench_data
