"""Whole-word masking for the masked-LM half of Recformer pre-training.

Words come from a per-token word-start flag (computed once from the fast tokenizer's word ids when items are
tokenized), so the same code serves byte-level BPE and WordPiece vocabularies. Everything is tensor ops over the
whole batch: no per-token Python.
"""

import torch

IGNORE_INDEX = -100  # label of tokens the MLM loss skips (torch's cross_entropy default ignore_index)


def word_ids(word_start: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """(B, L) index of the word each maskable token belongs to, counted from 0 per row; -1 on other tokens.

    A maskable token opens a new word when it is flagged as a word start or when the token before it is not
    maskable (a word never spans a special token, an item boundary's leading token or padding).
    """
    previous_maskable = torch.nn.functional.pad(maskable[:, :-1], (1, 0), value=False)
    opens_word = maskable & (word_start | ~previous_maskable)
    ids = torch.cumsum(opens_word.long(), dim=1) - 1
    return torch.where(maskable, ids, torch.full_like(ids, -1))


def choose_words(word_of_token: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, L) bool: tokens of whole words picked in random order until about `probability` of the row is covered.

    As in BERT's whole-word masking, each row has a budget of round(probability * maskable tokens) predictions (at
    least one when it has any maskable token) and takes whole words in a random order; the selection ends at the word
    boundary nearest to the budget (a word is taken while its midpoint lies within the budget), so the masked share
    is `probability` on average, and the first word is always taken.
    """
    batch, length = word_of_token.shape
    maskable = word_of_token >= 0
    slot = word_of_token.clamp(min=0)
    word_length = torch.zeros(batch, length, dtype=torch.long).scatter_add_(1, slot, maskable.long())  # (B, W=L)
    exists = word_length > 0
    keys = torch.rand(batch, length, generator=generator).masked_fill(~exists, float("inf"))
    order = torch.argsort(keys, dim=1)  # existing words first, in random order
    sorted_length = torch.gather(word_length, 1, order)
    before = torch.cumsum(sorted_length, dim=1) - sorted_length  # tokens of the words ahead in the order
    budget = torch.clamp(torch.round(maskable.sum(1) * probability), min=1).long().unsqueeze(1)  # (B, 1)
    first = torch.arange(length).unsqueeze(0) == 0
    within = 2 * before + sorted_length <= 2 * budget  # midpoint of the word within the budget
    take_sorted = torch.gather(exists, 1, order) & (within | first)
    take_word = torch.zeros_like(take_sorted).scatter_(1, order, take_sorted)
    return maskable & torch.gather(take_word, 1, slot)


def whole_word_mask(
    input_ids: torch.Tensor,
    word_start: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask whole words of a (B, L) batch for masked-LM training.

    Args:
        input_ids: (B, L) int64 token ids.
        word_start: (B, L) bool, True on the first token of each word.
        maskable: (B, L) bool, False on special tokens and padding, which are never chosen.
    Returns:
        (mlm_input_ids, labels), both (B, L) int64: of the chosen tokens 80% become `mask_token_id`, 10% a random
        token, 10% stay; labels hold the original id on chosen tokens and IGNORE_INDEX elsewhere.
    """
    chosen = choose_words(word_ids(word_start.bool(), maskable.bool()), probability, generator)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    draw = torch.rand(input_ids.shape, generator=generator)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked = torch.where(chosen & (draw < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, masked)
    return masked, labels
