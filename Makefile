# Everything a new machine needs: `make install`, then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test mutation demo demo-video gpu-check app clean

install: $(STAMP)

# the requirements, then this project itself (editable: imports resolve to this checkout)
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Mutation testing of the core modules (not part of `make test`): mutmut, one module at a time
# with that module's own test files, niced. Scores and survivors: out/mutation/; docs/testing.md.
# MODULES=metrics (see tools/measure/mutation.py --list), JOBS=1 on a busy machine.
MODULES ?=
JOBS ?= 2
mutation: $(STAMP)
	nice -n 10 $(PY) tools/measure/mutation.py $(MODULES) --jobs $(JOBS)

# The no-download demo (tools/demo.py): synthetic data, a backbone pretrained on fold 0's training
# classes, then NTRENet++, PFENet and NTRENet++ without BG/DO elimination trained on it (1-shot)
# and tested, beside a training-free prototype matcher and the all-foreground prediction on the
# same episodes. DEMO_ARGS: KEY VALUE overrides for every step, e.g. DEMO_ARGS="manual_seed 322".
demo: $(STAMP)
	$(PY) tools/demo.py $(DEMO_ARGS)

# Everything the code does on a GPU, in one call (< 8 min): summary.md + summary.json in OUT.
OUT ?= gpu-check
gpu-check: $(STAMP)
	PYTHON=$(PY) sh tools/measure/gpu_check.sh $(OUT)

# The no-download video demo (tools/demo.py --video): the image demo's data and pretrained
# backbone, synthetic videos in the YouTube-VIS format prepared like the real data, NTRENet++'s
# video network trained on fold 0 (3 frames, 3 paired supports), every held-out video scored,
# beside the all-foreground prediction on the same episodes.
demo-video: $(STAMP)
	$(PY) tools/demo.py --video $(DEMO_ARGS)

# The browser page (app/; docs/guide.md, "The browser page"): installs the optional [app] extra
# (Gradio) once, then serves on 127.0.0.1:7860 with every checkpoint under exp/, the demo's first.
# APP_ARGS, e.g. APP_ARGS="--port 7861 --checkpoint path/to/best.pth" (python -m app --help).
APP_STAMP := $(VENV)/.app-installed
APP_ARGS ?=
$(APP_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e ".[app]"
	touch $(APP_STAMP)

app: $(APP_STAMP)
	$(PY) -m app $(APP_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
