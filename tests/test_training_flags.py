"""Flags that change how a model trains, run end to end on the synthetic data: --compile (SASRec, BERT4Rec) trains
as the eager model does, --dtype float16 fine-tunes Recformer with loss scaling, --fix-word-embedding keeps the word
table as it was, --finetune-negatives trains on a sampled softmax."""

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_recformer
import train_bert4rec
import train_sasrec

WORDS = "longformer.embeddings.word_embeddings.weight"


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def inductor_cache_per_isa(monkeypatch):
    """Inductor's on-disk cache does not tell ATEN_CPU_CAPABILITY settings apart (torch 2.13): kernels cached under
    one and loaded under another gave NaN scores and heap corruption. One cache directory per setting."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"torchinductor-{capability}"))


@pytest.mark.parametrize("script", [train_sasrec, train_bert4rec], ids=["sasrec", "bert4rec"])
def test_compile_trains_as_the_eager_model(script, synthetic_data, tmp_path, inductor_cache_per_isa):
    """torch.compile (inductor, here on the CPU) changes kernels, not the model: without dropout (whose random
    numbers a compiled graph draws differently) the same loss and validation metrics up to float rounding, and the
    checkpoint keeps the eager model's parameter names."""
    common = dict(data=synthetic_data, hidden_size=16, num_heads=2, epochs=1, sample_size=20, dropout=0.0,
                  device="cpu", tensorboard=False)  # fmt: skip
    script.main(script.Args(out=tmp_path / "eager", **common))
    script.main(script.Args(out=tmp_path / "compiled", compile=True, **common))
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for a, b in zip(eager, compiled, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["NDCG@10"] == pytest.approx(a["NDCG@10"], abs=0.02)
    saved = torch.load(tmp_path / "compiled" / "best.pt", weights_only=True)["model"]
    assert saved.keys() == torch.load(tmp_path / "eager" / "best.pt", weights_only=True)["model"].keys()


def finetune(data, out, **flags) -> None:
    """One epoch of each stage on the tiny backbone."""
    finetune_recformer.main(finetune_recformer.Args(
        data=data, backbone="tiny", out=out, epochs=1, patience=1, batch_size=32, grad_accum=1, lr=1e-3,
        warmup_steps=1, sample_size=20, device="cpu", seed=0, tensorboard=False, **flags,
    ))  # fmt: skip


def test_float16_fine_tuning_scales_its_loss(synthetic_data, tmp_path, monkeypatch):
    """--dtype float16 runs under float16 autocast with a GradScaler that scales every loss (on the CPU too: a
    GradScaler made for CUDA disables itself there)."""
    scaled = []
    real_scale = torch.amp.GradScaler.scale

    def scale(self, outputs):
        scaled.append(self.is_enabled())
        return real_scale(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    finetune(synthetic_data, tmp_path / "run", dtype="float16")
    lines = metrics(tmp_path / "run")
    assert scaled and all(scaled)
    assert all(math.isfinite(line["train_loss"]) for line in lines if "train_loss" in line)
    assert (tmp_path / "run" / "test_metrics.json").exists()


def test_fix_word_embedding_keeps_the_word_table(synthetic_data, tmp_path):
    """Stage 2 trains on from the best stage-1 model: with --fix-word-embedding its word table leaves stage 2 as it
    entered while the other weights move; without the flag the word table moves too."""
    for name, fixed in (("fixed", True), ("free", False)):
        finetune(synthetic_data, tmp_path / name, fix_word_embedding=fixed)
    stage1, stage2 = (load_file(str(tmp_path / "fixed" / s / "model.safetensors")) for s in ("stage1", "stage2"))
    assert torch.equal(stage1[WORDS], stage2[WORDS])
    assert any(not torch.equal(stage1[k], stage2[k]) for k in stage1 if k != WORDS)
    free1, free2 = (load_file(str(tmp_path / "free" / s / "model.safetensors")) for s in ("stage1", "stage2"))
    assert not torch.equal(free1[WORDS], free2[WORDS])


def test_finetune_negatives_trains_on_a_sampled_softmax(synthetic_data, tmp_path):
    """Against 3 random items instead of all 120 the label competes with far fewer scores: a much lower loss from
    the same start, and a run of its own."""
    finetune(synthetic_data, tmp_path / "sampled", finetune_negatives=3, stages=1)
    finetune(synthetic_data, tmp_path / "full", stages=1)
    sampled = [line["train_loss"] for line in metrics(tmp_path / "sampled") if "train_loss" in line]
    full = [line["train_loss"] for line in metrics(tmp_path / "full") if "train_loss" in line]
    assert sampled and len(sampled) == len(full)
    assert all(s < f - 1.0 for s, f in zip(sampled, full)), (sampled, full)
    assert json.loads((tmp_path / "sampled" / "config.json").read_text())["finetune_negatives"] == 3
