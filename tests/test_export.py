"""export_embeddings.py: the item table file, its determinism and its one-line errors."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import export_embeddings
import finetune_recformer
from common.data import load_dataset
from common.recformer_data import build_batch, dataset_item_tokens
from common.run import InputError
from recformer.convert_recformer import load_backbone, save_checkpoint
from recformer.modeling_recformer import RecformerForSeqRec


@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_data, tmp_path_factory):
    data = load_dataset(synthetic_data, verbose=False)
    torch.manual_seed(0)
    model, tokenizer = load_backbone("tiny", RecformerForSeqRec, data.item_text)
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(directory, model, tokenizer)
    return directory


def export(checkpoint, data, out, **kwargs):
    args = export_embeddings.Args(checkpoint=str(checkpoint), data=data, out=out, device="cpu", **kwargs)
    export_embeddings.main(args)
    return load_file(str(out))["item_embeddings"]


def test_export_writes_the_encoders_one_item_vectors(tiny_checkpoint, synthetic_data, tmp_path):
    data = load_dataset(synthetic_data, verbose=False)
    table = export(tiny_checkpoint, synthetic_data, tmp_path / "plm.safetensors", batch_size=7)
    assert table.shape == (data.num_items + 1, 64)
    assert torch.count_nonzero(table[0]) == 0
    with safe_open(str(tmp_path / "plm.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["dataset_fingerprint"] == data.fingerprint and metadata["checkpoint"] == str(tiny_checkpoint)
    # Reference: the model's own forward pass on each item alone, in item-id order, no batching.
    model, tokenizer = load_backbone(str(tiny_checkpoint), RecformerForSeqRec)
    tokens = dataset_item_tokens(tokenizer, data)
    with torch.no_grad():
        for item in (1, 17, data.num_items):
            alone = model.eval()(**build_batch(tokens, [[item]], model.config))[0]
            torch.testing.assert_close(table[item], alone, atol=1e-5, rtol=1e-5)


def test_export_is_deterministic(tiny_checkpoint, synthetic_data, tmp_path):
    first = export(tiny_checkpoint, synthetic_data, tmp_path / "a.safetensors")
    second = export(tiny_checkpoint, synthetic_data, tmp_path / "b.safetensors")
    assert torch.equal(first, second)
    # The random "tiny" backbone itself (tokenizer training included) is reproducible from the seed.
    assert torch.equal(
        export("tiny", synthetic_data, tmp_path / "c.safetensors", seed=3),
        export("tiny", synthetic_data, tmp_path / "d.safetensors", seed=3),
    )


def finetune(data, out, dtype):
    """One epoch of each stage with --dtype `dtype` (a few steps of 32 users; no TensorBoard)."""
    finetune_recformer.main(finetune_recformer.Args(
        data=data, backbone="tiny", out=out, epochs=1, patience=1, batch_size=32, grad_accum=1, lr=1e-3,
        warmup_steps=1, sample_size=20, device="cpu", seed=0, dtype=dtype, tensorboard=False,
    ))  # fmt: skip


def test_export_of_stage1_writes_the_table_stage2_trained_against(synthetic_data, tmp_path):
    """Stage 2 trains against the table of the best stage-1 encoder: exporting <run>/stage1 must write exactly it,
    not the table stage 1's validation used (the untrained encoder's here: one epoch, encoded at its start)."""
    run = tmp_path / "run"
    finetune(synthetic_data, run, "float32")
    stage2_table = load_file(str(run / "stage2" / "item_table.safetensors"))["item_embeddings"]
    exported = export(run / "stage1", synthetic_data, tmp_path / "run.safetensors")
    assert torch.equal(exported, stage2_table)
    assert torch.count_nonzero(exported[0]) == 0
    stage1_table = load_file(str(run / "stage1" / "item_table.safetensors"))["item_embeddings"]
    assert (exported - stage1_table).abs().max() > 1e-3  # fine-tuning moved the vectors


def test_export_encodes_in_the_precision_of_the_finetuning_run(synthetic_data, tmp_path):
    """A bfloat16 fine-tuning run trains stage 2 against its best stage-1 encoder's table under bf16 autocast:
    exporting <run>/stage1 without --dtype writes exactly that table; --dtype float32 overrides the run's choice."""
    run = tmp_path / "run"
    finetune(synthetic_data, run, "bfloat16")
    stage2_table = load_file(str(run / "stage2" / "item_table.safetensors"))["item_embeddings"]
    assert torch.equal(export(run / "stage1", synthetic_data, tmp_path / "run.safetensors"), stage2_table)
    float32 = export(run / "stage1", synthetic_data, tmp_path / "float32.safetensors", dtype="float32")
    assert (float32 - stage2_table).abs().max() > 1e-3  # bf16 autocast really changes the vectors


def test_run_dtype_comes_only_from_a_run_directorys_config(tiny_checkpoint, tmp_path):
    assert export_embeddings.run_dtype(str(tiny_checkpoint)) is None  # no config.json beside the checkpoint
    assert export_embeddings.run_dtype("tiny") is None
    stage = tmp_path / "run" / "stage1"
    stage.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"dtype": "float16", "epochs": 3}))
    assert export_embeddings.run_dtype(str(stage)) == "float16"
    (tmp_path / "run" / "config.json").write_text("[1, 2")  # not a run's config: ignored, not an error
    assert export_embeddings.run_dtype(str(stage)) is None


def test_bad_checkpoint_fails_in_one_line(synthetic_data, tmp_path):
    out = tmp_path / "never.safetensors"
    with pytest.raises(InputError) as error:
        export(tmp_path / "missing", synthetic_data, out)
    message = str(error.value)
    assert "missing" in message and "\n" not in message
    assert not out.exists()


def test_dataset_without_text_fails_in_one_line(tiny_checkpoint, synthetic_data, tmp_path):
    id_only = tmp_path / "id_only"
    shutil.copytree(synthetic_data, id_only, ignore=shutil.ignore_patterns("meta_data.json", "recformer_tokens"))
    stats = json.loads((id_only / "stats.json").read_text())
    assert stats["users"] > 0
    out = tmp_path / "never.safetensors"
    with pytest.raises(InputError) as error:
        export(tiny_checkpoint, id_only, out)
    assert "meta_data.json" in str(error.value) and "\n" not in str(error.value)
    assert not out.exists()


def test_fast_attention_exports_the_hf_table(tiny_checkpoint, synthetic_data, tmp_path):
    fast = export(tiny_checkpoint, synthetic_data, tmp_path / "fast.safetensors", attention="fast")
    hf = export(tiny_checkpoint, synthetic_data, tmp_path / "hf.safetensors", attention="hf")
    torch.testing.assert_close(fast, hf, atol=1e-4, rtol=0)
