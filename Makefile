# Everything a new machine needs: `make install`, then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test mutation demo demo-video gpu-check clean

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

# The no-download demo: synthetic data, train fold 0 (1-shot), evaluate, compare with a
# training-free prototype matcher and the all-foreground prediction on the same episodes.
DEMO_EXP := exp/synthetic/split0_resnet18
demo: $(STAMP)
	$(PY) tools/make_synthetic.py --out data/synthetic --train 4000
	PYTHON=$(PY) sh train.sh synthetic split0_resnet18 resume '' overwrite True $(DEMO_ARGS)
	PYTHON=$(PY) sh test.sh synthetic split0_resnet18 weight best $(DEMO_ARGS)
	$(PY) tools/baseline.py --config config/synthetic/synthetic_split0_resnet18.yaml $(DEMO_ARGS) \
		--compare "$$(ls -t $(DEMO_EXP)/result/test_*.json | head -n 1)"

# Everything the code does on a GPU, in one call (< 8 min): summary.md + summary.json in OUT.
OUT ?= gpu-check
gpu-check: $(STAMP)
	PYTHON=$(PY) sh tools/measure/gpu_check.sh $(OUT)

# The no-download video demo: synthetic videos in the YouTube-VIS format, prepared like the real
# data, train fold 0 (3 frames, 3 paired supports), evaluate every held-out video, compare with
# the trivial all-foreground prediction on the same episodes.
DEMO_VIDEO_CFG := config/synthetic_video/synthetic_video_split0_resnet18.yaml
DEMO_VIDEO_EXP := exp/synthetic_video/split0_resnet18
demo-video: $(STAMP)
	$(PY) tools/make_synthetic_video.py --out data/synthetic_video
	$(PY) tools/prepare_ytvis.py --ytvis data/synthetic_video --out data/synthetic_video
	PYTHON=$(PY) sh train.sh synthetic_video split0_resnet18 resume '' overwrite True $(DEMO_ARGS)
	PYTHON=$(PY) sh test.sh synthetic_video split0_resnet18 weight best $(DEMO_ARGS)
	$(PY) tools/baseline.py --config $(DEMO_VIDEO_CFG) $(DEMO_ARGS) \
		--compare "$$(ls -t $(DEMO_VIDEO_EXP)/result/test_*.json | head -n 1)"

clean:
	rm -rf $(VENV) .pytest_cache
