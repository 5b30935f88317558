"""The fast Recformer attention (recformer/attention_recformer.py) against Hugging Face's Longformer attention."""

import pytest
import torch

from recformer import attention_recformer
from recformer.attention_recformer import run_encoder
from recformer.configuration_recformer import RecformerConfig
from recformer.modeling_recformer import RecformerForSeqRec, RecformerModel, set_attention

WIDTH = 16


def random_encoder(window: int, seed: int = 0) -> RecformerModel:
    """Two layers, eval mode, weights large enough that every attention weight matters."""
    torch.manual_seed(seed)
    config = RecformerConfig(
        vocab_size=50, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        attention_window=window, max_position_embeddings=200, pad_token_id=1, bos_token_id=0,
    )  # fmt: skip
    model = RecformerModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.3)
    return model


def random_masks(batch: int, length: int, generator: torch.Generator):
    """Recformer's masks: row 0 uses the whole length, the others random lengths >= 1; global token 0."""
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    global_attention_mask = torch.zeros(batch, length, dtype=torch.long)
    global_attention_mask[:, 0] = 1
    return attention_mask, global_attention_mask


def outputs_and_gradients(encode, hidden: torch.Tensor):
    """(output, d loss / d input, d loss / d parameters) for a loss that weighs every output differently."""
    hidden = hidden.clone().requires_grad_(True)
    out = encode(hidden)
    weights = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    (out.float() * weights).sum().backward()
    return out.detach(), hidden.grad


def parameter_gradients(model: RecformerModel) -> list[torch.Tensor]:
    """Gradients of the encoder's parameters; none counts as zero (the fast path never uses the global key bias,
    which cancels in the softmax, so its gradient is exactly zero)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.encoder.parameters()]


def lengths_for(window: int) -> list[int]:
    """Every length from 1 to two windows: every residue modulo the window, shorter and longer than it."""
    return list(range(1, 2 * window + 1))


@pytest.mark.parametrize("kernel", ["dense", "blocked"])
@pytest.mark.parametrize("window", [4, 8, 16])
def test_fast_equals_hf_in_float32(kernel, window):
    compare_in_float32(kernel, window)


def test_zero3_global_row_equals_hf(monkeypatch):
    """Under DeepSpeed ZeRO-3 the global row projects every token (its weights exist only inside forward)."""
    monkeypatch.setattr(attention_recformer, "fetched_in_forward", lambda linear: True)
    compare_in_float32("dense", 8)


def compare_in_float32(kernel: str, window: int) -> None:
    """Outputs, input and parameter gradients of run_encoder against the hf path to 1e-5, for every length from 1
    to two windows, batches of 1 and 3 rows with random padding."""
    model = random_encoder(window)
    generator = torch.Generator().manual_seed(window)
    for batch in (1, 3):
        for length in lengths_for(window):
            attention_mask, global_attention_mask = random_masks(batch, length, generator)
            hidden = torch.randn(batch, length, WIDTH, generator=generator)
            model.zero_grad()
            hf = outputs_and_gradients(lambda x: model.encode(x, attention_mask, global_attention_mask), hidden)
            hf_params = parameter_gradients(model)
            model.zero_grad()
            valid = attention_mask.bool()
            fast = outputs_and_gradients(lambda x: run_encoder(model.encoder, x, valid, kernel), hidden)
            where = f"kernel {kernel}, window {window}, batch {batch}, length {length}"
            # Padding rows included: Hugging Face's padding outputs are matched too.
            torch.testing.assert_close(fast[0], hf[0], atol=1e-5, rtol=0, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(fast[1], hf[1], atol=1e-5, rtol=0, msg=lambda m: f"{where}: {m}")
            for fast_grad, hf_grad in zip(parameter_gradients(model), hf_params):
                torch.testing.assert_close(fast_grad, hf_grad, atol=1e-5, rtol=0, msg=lambda m: f"{where}: {m}")


def test_flex_attention_kernel_equals_hf():
    """FlexAttention's mask rule, run unfused on the CPU (CUDA compiles the same call)."""
    window = 8
    model = random_encoder(window)
    generator = torch.Generator().manual_seed(1)
    for length in (3, 12, 21):
        attention_mask, global_attention_mask = random_masks(3, length, generator)
        hidden = torch.randn(3, length, WIDTH, generator=generator)
        with torch.no_grad():
            hf = model.encode(hidden, attention_mask, global_attention_mask)
            fast = run_encoder(model.encoder, hidden, attention_mask.bool(), "flex")
        torch.testing.assert_close(fast, hf, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["dense", "blocked"])
def test_fast_equals_hf_in_bfloat16(kernel):
    """Under bf16 autocast both paths round differently; each stays within bf16 error of the other."""
    window = 8
    model = random_encoder(window)
    generator = torch.Generator().manual_seed(2)
    for length in (5, 16, 23):
        attention_mask, global_attention_mask = random_masks(3, length, generator)
        hidden = torch.randn(3, length, WIDTH, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hf = outputs_and_gradients(lambda x: model.encode(x, attention_mask, global_attention_mask), hidden)
            fast = outputs_and_gradients(lambda x: run_encoder(model.encoder, x, attention_mask.bool(), kernel), hidden)
        with torch.no_grad():
            exact = model.encode(hidden, attention_mask, global_attention_mask)
        bf16_error = (hf[0].float() - exact).abs().max()
        assert 0 < bf16_error < 0.1  # the autocast really ran in bf16
        torch.testing.assert_close(fast[0].float(), hf[0].float(), atol=4 * bf16_error, rtol=0)
        gradient_scale = hf[1].abs().max()
        torch.testing.assert_close(fast[1], hf[1], atol=0.05 * gradient_scale, rtol=0)


def test_models_default_to_fast_and_switch_to_hf():
    torch.manual_seed(0)
    config = RecformerConfig(
        vocab_size=50, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        attention_window=4, max_position_embeddings=200, pad_token_id=1, bos_token_id=0,
    )  # fmt: skip
    model = RecformerForSeqRec(config).eval()
    assert model.longformer.attention == "fast"
    generator = torch.Generator().manual_seed(3)
    attention_mask, global_attention_mask = random_masks(3, 11, generator)
    batch = {
        "input_ids": torch.randint(2, 50, (3, 11), generator=generator),
        "attention_mask": attention_mask,
        "token_type_ids": torch.randint(0, 4, (3, 11), generator=generator),
        "item_position_ids": torch.randint(0, 51, (3, 11), generator=generator),
        "global_attention_mask": global_attention_mask,
    }
    with torch.no_grad():
        fast = model(**batch)
        set_attention(model, "hf")
        assert model.longformer.attention == "hf"
        hf = model(**batch)
    torch.testing.assert_close(fast, hf, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention"):
        set_attention(model, "flash")


def test_fast_attention_refuses_other_global_tokens():
    model = random_encoder(4)
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    global_attention_mask = torch.zeros(2, 6, dtype=torch.long)
    global_attention_mask[:, 0] = 1
    global_attention_mask[1, 3] = 1
    with pytest.raises(ValueError, match="first token only"):
        model.encode(torch.randn(2, 6, WIDTH), attention_mask, global_attention_mask)


def test_unknown_kernel_is_refused():
    model = random_encoder(4)
    with pytest.raises(ValueError, match="kernel"):
        run_encoder(model.encoder, torch.randn(1, 3, WIDTH), torch.ones(1, 3, dtype=torch.bool), "sparse")
