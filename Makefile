# Two entry points on a fresh machine: `make demo` (the whole pipeline on built-in synthetic data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export RECSYS_QUIET ?= 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean reproduce

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-test.txt
	touch $@

# The whole pipeline on the built-in synthetic data, small settings (a few minutes on 2 CPU cores).
SMALL := --hidden-size 64 --lr 1e-3 --sample-size 100
demo: venv
	$(PY) prepare_data.py synthetic --out data/synthetic --overwrite
	$(PY) prepare_data.py synthetic --out data/synthetic-heldout --users 100 --seed 1 --overwrite
	$(PY) prepare_data.py pretrain-corpus --from data/synthetic --dev data/synthetic-heldout --out data/corpus --overwrite
	@echo "The runs go to runs/demo/{pretrain,recformer,sasrec,sasrec-plm,bert4rec,bert4rec-plm}, replacing those of an \
	earlier make demo (each stage's --overwrite)."
	$(VENV)/bin/deepspeed --num_gpus 1 pretrain_recformer.py --data data/corpus --backbone tiny --out runs/demo/pretrain \
	  --overwrite --zero-stage 2 --batch-size 16 --grad-accum 1 --lr 2e-3 --warmup-steps 10 --epochs 2 --max-steps 150 \
	  --eval-every 50
	$(PY) finetune_recformer.py --backbone runs/demo/pretrain/best --out runs/demo/recformer --overwrite \
	  --epochs 2 --grad-accum 1 --lr 1e-3 --warmup-steps 10 --sample-size 100
	$(PY) export_embeddings.py --checkpoint runs/demo/recformer/stage1 --overwrite
	$(PY) train_sasrec.py --init-type none --out runs/demo/sasrec --overwrite $(SMALL) --dropout 0.2 --epochs 20
	$(PY) train_sasrec.py --init-type plm --init-transform whiten --out runs/demo/sasrec-plm --overwrite $(SMALL) \
	  --dropout 0.2 --epochs 20
	$(PY) train_bert4rec.py --init-type none --out runs/demo/bert4rec --overwrite $(SMALL) --batch-size 64 --epochs 20
	$(PY) train_bert4rec.py --init-type plm --init-transform whiten --out runs/demo/bert4rec-plm --overwrite $(SMALL) \
	  --batch-size 64 --epochs 20
	@echo "Test metrics on data/synthetic, 100 sampled negatives per user:"
	@$(PY) -m common.report Recformer=runs/demo/recformer SASRec=runs/demo/sasrec SASRec+PLM=runs/demo/sasrec-plm \
	  BERT4Rec=runs/demo/bert4rec BERT4Rec+PLM=runs/demo/bert4rec-plm
	@echo "Each run's config.json, metrics.jsonl and test_metrics.json are in runs/demo/<run>/;" \
	  "curves: $(VENV)/bin/tensorboard --logdir runs/demo"

# The paper's grid on one dataset (reproduce.py): make reproduce DATA=data/scientific BACKBONE=<model dir> [OUT=...]
# [ARGS="--seeds 42 43 --epochs 50 ..."]; a second call resumes (docs/reproduce.md).
ifneq ($(filter reproduce,$(MAKECMDGOALS)),)
ifeq ($(and $(DATA),$(BACKBONE)),)
$(error usage: make reproduce DATA=<dataset dir> BACKBONE=<model> [OUT=dir] [ARGS="reproduce.py flags"])
endif
endif
reproduce: venv
	$(PY) reproduce.py --data $(DATA) --backbone $(BACKBONE) --out $(or $(OUT),runs/reproduce/$(notdir $(DATA))) $(ARGS)

test: venv
	RECSYS_QUIET=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) data/synthetic data/synthetic-heldout data/corpus runs
