"""The paper's released files (777pomingzi/Rethinking-PLM-in-RS), written here in its layouts: dataset.pkl and the
negatives cache through `prepare_data.py paper`, bare-tensor item tables, fine-tuned .bin files, and our tables
exported in the paper's layout and read back as its code reads them."""

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import export_embeddings
import train_sasrec
from common.data import DatasetError, load_dataset
from common.embeddings import (
    EmbeddingFileError,
    load_item_embeddings,
    save_item_embeddings,
)
from common.evaluation import evaluate, result_line
from common.run import InputError
from prepare_data import Paper, Recformer, run, write_dataset
from recformer.convert_recformer import BackboneError, load_backbone, save_checkpoint
from recformer.modeling_recformer import RecformerForSeqRec, RecformerModel

# The paper's dataset.pkl (SASRec/main.py, Bert4Rec/datasets/dataset.py): 1-based uids and sids, leave-one-out,
# smap {original item id: sid}. Item "J" (sid 10) is in the catalogue but in no sequence.
SMAP = {key: sid for sid, key in enumerate("ABCDEFGHIJ", start=1)}
TRAIN = {1: [1, 2, 3], 2: [4, 5], 3: [6, 1, 7, 2], 4: [8]}
VAL = {1: [4], 2: [6], 3: [8], 4: [9]}
TEST = {1: [5], 2: [7], 3: [9], 4: [1]}
# The negatives cache random-sample_size3-seed98765.pkl: {uid: [sid, ...]}, items the user never touched.
NEGATIVES = {1: [10, 9, 6], 2: [1, 10, 2], 3: [3, 10, 4], 4: [2, 3, 10]}
META = {key: {"title": f"title {key}", "brand": f"brand {key}", "category": "c"} for key in [*SMAP, "Z"]}


def paper_pickle(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def paper_dataset(umap: bool = True) -> dict:
    dataset = {"train": TRAIN, "val": VAL, "test": TEST, "smap": SMAP}
    return dataset | ({"umap": {f"user-{uid}": uid for uid in TRAIN}} if umap else {})


@pytest.fixture
def imported(tmp_path):
    """A dataset imported from the paper's files, negatives as numpy integers (as its sampler draws them)."""
    numpy_negatives = {uid: [np.int64(sid) for sid in sids] for uid, sids in NEGATIVES.items()}
    paper = Paper(
        pkl=paper_pickle(tmp_path / "dataset.pkl", paper_dataset()),
        negatives=paper_pickle(tmp_path / "random-sample_size3-seed98765.pkl", numpy_negatives, protocol=2),
        meta=tmp_path / "meta_data.json",
        out=tmp_path / "data",
    )
    paper.meta.write_text(json.dumps(META))
    run(paper)
    return load_dataset(paper.out)


def test_paper_import_keeps_the_papers_numbering_and_text(imported):
    data = imported
    assert data.item_keys[1:] == list(SMAP)  # sid i is our item id i
    for row, user in enumerate(data.user_keys):
        uid = int(user.removeprefix("user-"))
        assert data.sequence(row).tolist() == TRAIN[uid] + VAL[uid] + TEST[uid]
        assert data.train_len[row] == len(TRAIN[uid])
    assert json.loads((data.path / "train.json").read_text()) == {str(uid): seq for uid, seq in TRAIN.items()}
    assert data.item_text[SMAP["C"]] == META["C"]
    assert data.keeps_imported_numbering


@pytest.mark.parametrize("protocol", [2, 4])
def test_paper_import_reads_numpy_integers_and_no_umap(tmp_path, protocol):
    as_numpy = {name: {np.int64(u): [np.int32(i) for i in seq] for u, seq in split.items()}
                for name, split in (("train", TRAIN), ("val", VAL), ("test", TEST))}  # fmt: skip
    pkl = paper_pickle(tmp_path / "dataset.pkl", as_numpy | {"smap": SMAP}, protocol=protocol)
    run(Paper(pkl=pkl, out=tmp_path / "data"))
    data = load_dataset(tmp_path / "data")
    assert data.user_keys == ["1", "2", "3", "4"] and data.item_text is None
    assert data.sequence(2).tolist() == TRAIN[3] + VAL[3] + TEST[3]


def test_the_papers_negatives_are_exactly_the_candidates(imported):
    data = imported
    seen = []

    def recording_scorer(histories, candidates):
        seen.append(candidates.clone())
        return torch.zeros(candidates.shape)

    metrics = evaluate(recording_scorer, data, "test", max_len=5, sample_size=3, device="cpu")
    candidates = torch.cat(seen)
    for row, user in enumerate(data.user_keys):
        uid = int(user.removeprefix("user-"))
        assert candidates[row].tolist() == TEST[uid] + NEGATIVES[uid]
    assert metrics["protocol"] == "sampled-3, the paper's negatives"
    assert result_line("test", metrics).startswith("test (sampled-3, the paper's negatives): ")
    assert not (data.path / "negatives").exists()  # nothing drawn
    evaluate(recording_scorer, data, "test", max_len=5, sample_size=2, device="cpu")
    assert (data.path / "negatives").is_dir()  # another count: drawn as for any dataset


def test_a_trainer_scores_the_papers_negatives(imported, tmp_path):
    args = train_sasrec.Args(data=imported.path, out=tmp_path / "run", hidden_size=8, num_heads=2, epochs=1,
                             sample_size=3, device="cpu")  # fmt: skip
    assert train_sasrec.main(args)["protocol"] == "sampled-3, the paper's negatives"
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["protocol"].endswith("paper's negatives")


class RunsCode:
    """A pickled object whose reduce would create a directory: only a refusing unpickler leaves none."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("case", ["code", "float", "tuple", "set", "numpy float", "numpy array"])
def test_the_unpickler_refuses_anything_but_plain_data(tmp_path, case):
    marker = tmp_path / "code-ran"
    bad, expected = {
        "code": (RunsCode(marker), f"refused global {os.mkdir.__module__}.mkdir"),
        "float": (1.5, "holds a float"),
        "tuple": ((1, 2), "holds a tuple"),
        "set": ({1, 2}, "holds a set"),
        "numpy float": (np.float64(1.5), "refused numpy dtype 'f8'"),
        "numpy array": (np.arange(3), "refused global numpy"),
    }[case]
    pkl = paper_pickle(tmp_path / "dataset.pkl", paper_dataset() | {"train": {1: [bad]}})
    with pytest.raises(DatasetError) as refusal:
        run(Paper(pkl=pkl, out=tmp_path / "data"))
    message = str(refusal.value)
    assert message.startswith(f"{pkl}: ") and "\n" not in message and expected in message
    assert not marker.exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("change, message", [
    (lambda d: d | {"smap": {**SMAP, "K": 12}}, "'smap' ids are not 1..11"),
    (lambda d: d | {"val": {**VAL, 1: [4, 5]}}, "user 1 of 'val' has 2 items"),
    (lambda d: d | {"test": {u: s for u, s in TEST.items() if u != 2}}, "'test' has not one target for every user"),
    (lambda d: d | {"train": {**TRAIN, 1: [1, 11]}}, "item id 11 is not in 'smap'"),
    (lambda d: [d], "holds a list"),
])  # fmt: skip
def test_bad_paper_pickles_are_one_line_errors(tmp_path, change, message):
    pkl = paper_pickle(tmp_path / "dataset.pkl", change(paper_dataset()))
    with pytest.raises(DatasetError, match=message):
        run(Paper(pkl=pkl, out=tmp_path / "data"))
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("negatives, message", [
    ({**NEGATIVES, 1: [10, 9, 4]}, "negatives of user 1 repeat an item or hold one of the user's own"),
    ({**NEGATIVES, 1: [10, 9]}, "different numbers of negatives"),
    ({u: s for u, s in NEGATIVES.items() if u != 3}, "not given for exactly the users"),
])  # fmt: skip
def test_bad_paper_negatives_are_one_line_errors(tmp_path, negatives, message):
    paper = Paper(pkl=paper_pickle(tmp_path / "dataset.pkl", paper_dataset()),
                  negatives=paper_pickle(tmp_path / "negatives.pkl", negatives), out=tmp_path / "data")  # fmt: skip
    with pytest.raises(DatasetError, match=message):
        run(paper)
    assert not (tmp_path / "data").exists()


def bare_table(rows: int, dim: int = 8) -> torch.Tensor:
    """The paper's item table: float32 (items + 1, d), row 0 zeros (Recformer/finetune.py convert_save_embddings)."""
    table = torch.arange(rows * dim, dtype=torch.float32).reshape(rows, dim) / 100
    table[0] = 0.0
    return table


def test_a_bare_tensor_loads_only_where_its_rows_are_provably_the_items(imported, tmp_path):
    torch.save(bare_table(len(SMAP) + 1), tmp_path / "item_embeddings_X")
    assert torch.equal(load_item_embeddings(tmp_path / "item_embeddings_X", imported), bare_table(len(SMAP) + 1))
    # The same items and row count, numbered the other way round: refused, or mapped by the paper's smap.
    sequences = {str(uid): [list(SMAP)[sid - 1] for sid in TRAIN[uid] + VAL[uid] + TEST[uid]] for uid in TRAIN}
    write_dataset(tmp_path / "renumbered", sequences, None, item_order=list(reversed(SMAP)))
    other = load_dataset(tmp_path / "renumbered")
    assert other.item_keys != imported.item_keys
    with pytest.raises(EmbeddingFileError, match="bare tensor names no items.*--embeddings-smap"):
        load_item_embeddings(tmp_path / "item_embeddings_X", other)
    (tmp_path / "smap.json").write_text(json.dumps({key: sid - 1 for key, sid in SMAP.items()}))  # Recformer: 0-based
    mapped = load_item_embeddings(tmp_path / "item_embeddings_X", other, tmp_path / "smap.json")
    for item, key in enumerate(other.item_keys[1:], start=1):
        assert torch.equal(mapped[item], bare_table(len(SMAP) + 1)[SMAP[key]])
    assert (mapped[0] == 0).all()
    # An imported dataset whose smap.json was edited since no longer provably shares the paper's numbering.
    smap = json.loads((imported.path / "smap.json").read_text())
    (imported.path / "smap.json").write_text(json.dumps(smap | {"A": smap["B"], "B": smap["A"]}))
    with pytest.raises(EmbeddingFileError, match="does not keep an imported smap's numbering"):
        load_item_embeddings(tmp_path / "item_embeddings_X", load_dataset(imported.path))


def test_recformer_import_keeps_numbering_too(imported, tmp_path):
    run(Recformer(dir=imported.path, out=tmp_path / "again"))
    again = load_dataset(tmp_path / "again")
    assert again.keeps_imported_numbering and again.numbering["source"] == "recformer"
    assert again.user_keys == imported.user_keys and np.array_equal(again.paper_negatives, imported.paper_negatives)


def test_embeddings_smap_refusals(imported, tmp_path):
    torch.save(bare_table(len(SMAP) + 1), tmp_path / "t.pt")
    (tmp_path / "short.json").write_text(json.dumps({"A": 1, "B": 2}))
    with pytest.raises(EmbeddingFileError, match="--embeddings-smap .*short.json has 2 items"):
        load_item_embeddings(tmp_path / "t.pt", imported, tmp_path / "short.json")
    save_item_embeddings(tmp_path / "ours.safetensors", bare_table(len(SMAP) + 1), imported, "test")
    with pytest.raises(EmbeddingFileError, match="names its dataset itself"):
        load_item_embeddings(tmp_path / "ours.safetensors", imported, imported.path / "smap.json")


def encoder_stage(data, directory):
    """A fine-tuning stage directory as finetune_recformer.save_stage writes it, with a stored table that no
    encoder produced (so a re-encoded table differs from it)."""
    torch.manual_seed(0)
    model, tokenizer = load_backbone("tiny", RecformerForSeqRec, data.item_text)
    stored = bare_table(data.num_items + 1, model.config.hidden_size)
    save_checkpoint(directory, model, tokenizer,
                    extra=lambda tmp: save_item_embeddings(tmp / "item_table.safetensors", stored, data, "test"))
    return stored  # fmt: skip


def read_as_the_paper_does(path, item_num, hidden):
    """SASRec/main.py and Bert4Rec/trainers/base.py: torch.load, then init_item_embedding."""
    embeddings = torch.load(path)
    sasrec = nn.Embedding.from_pretrained(embeddings, freeze=False, padding_idx=0)  # SASRec/model.py
    bert4rec = nn.Embedding.from_pretrained(torch.cat((embeddings, embeddings[:1]), dim=0), padding_idx=0)
    assert embeddings.dtype == torch.float32 and sasrec.weight.shape == (item_num + 1, hidden)
    assert bert4rec.weight.shape == (item_num + 2, hidden)  # BERT4Rec's vocabulary: items, padding, mask
    assert (embeddings[0] == 0).all()
    return embeddings


def test_export_stored_and_paper_layout(imported, tmp_path):
    stored = encoder_stage(imported, tmp_path / "stage1")

    def export(out, **flags):
        export_embeddings.main(export_embeddings.Args(checkpoint=str(tmp_path / "stage1"), data=imported.path,
                                                      out=out, device="cpu", **flags))  # fmt: skip

    export(tmp_path / "stored.pt", table="stored", format="torch")
    assert torch.equal(read_as_the_paper_does(tmp_path / "stored.pt", len(SMAP), stored.shape[1]), stored)
    export(tmp_path / "encoded.safetensors")
    export(tmp_path / "encoded.pt", format="torch")
    encoded = load_item_embeddings(tmp_path / "encoded.safetensors", imported)
    assert torch.equal(read_as_the_paper_does(tmp_path / "encoded.pt", len(SMAP), stored.shape[1]), encoded)
    assert not torch.allclose(encoded, stored)


# RecformerForSeqRec.state_dict() key names, from Recformer/recformer/models.py: RecformerEmbeddings, Hugging Face's
# LongformerEncoder layers, a pooler without weights; plus the position_ids buffer and item_embedding.
PAPER_EMBEDDING_KEYS = [
    "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight", "embeddings.item_position_embeddings.weight",
    "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
]  # fmt: skip
PAPER_LAYER_KEYS = [
    *(f"attention.self.{p}.{w}" for p in ("query", "key", "value", "query_global", "key_global", "value_global")
      for w in ("weight", "bias")),
    "attention.output.dense.weight", "attention.output.dense.bias", "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias", "intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight",
    "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias",
]  # fmt: skip


def paper_finetuned_bin(directory, item_num):
    """The paper's fine-tuned checkpoint, RecformerForSeqRec.state_dict(): the encoder under `longformer.` and
    `item_embedding.weight`, an nn.Embedding(item_num, hidden) without a padding row; config.json and tokenizer
    files beside it. Key names as listed above; tensors (by the same names) from a tiny model of ours."""
    torch.manual_seed(0)
    texts = [{}] + [{"title": f"lamp {i} red", "brand": f"acme{i % 3}"} for i in range(1, 30)]
    model, tokenizer = load_backbone("tiny", RecformerModel, texts)
    save_checkpoint(directory, model, tokenizer)
    ours = model.state_dict()
    names = PAPER_EMBEDDING_KEYS + [
        f"encoder.layer.{i}.{key}" for i in range(model.config.num_hidden_layers) for key in PAPER_LAYER_KEYS
    ]
    state = {f"longformer.{name}": ours[name] for name in names}
    state["longformer.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    item_embedding = torch.randn(item_num, model.config.hidden_size)
    state["item_embedding.weight"] = item_embedding
    torch.save(state, directory / "recformer_finetune.bin")
    return directory / "recformer_finetune.bin", item_embedding


def test_a_paper_finetuned_bin_keeps_its_item_table(imported, tmp_path, capsys):
    path, item_embedding = paper_finetuned_bin(tmp_path / "paper", len(SMAP))
    capsys.readouterr()
    load_backbone(str(path), RecformerForSeqRec)
    out = capsys.readouterr().out
    assert "unused" not in out and f"item_embedding.weight: the fine-tuned item table ({len(SMAP)} items)" in out
    assert "new 0 tensors" in out  # every encoder tensor came from the file
    args = export_embeddings.Args(checkpoint=str(path), data=imported.path, out=tmp_path / "t.safetensors",
                                  table="stored", device="cpu")  # fmt: skip
    export_embeddings.main(args)
    table = load_item_embeddings(tmp_path / "t.safetensors", imported)
    assert torch.equal(table[1:], item_embedding) and (table[0] == 0).all()
    other_catalogue, _ = paper_finetuned_bin(tmp_path / "p2", 4)
    with pytest.raises(InputError, match="5 rows, but .* has 10 items"):
        export_embeddings.main(
            dataclasses.replace(args, out=tmp_path / "u.safetensors", checkpoint=str(other_catalogue))
        )
    assert not (tmp_path / "u.safetensors").exists()


def test_a_lone_paper_bin_offline_says_which_files_to_put_beside_it(tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    if isinstance(huggingface_hub.try_to_load_from_cache("allenai/longformer-base-4096", "config.json"), str):
        pytest.skip("allenai/longformer-base-4096 is in the local Hugging Face cache")
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1")
    path = tmp_path / "recformer_seqrec_ckpt.bin"
    torch.save({"longformer.embeddings.word_embeddings.weight": torch.zeros(5, 4)}, path)
    with pytest.raises(BackboneError) as error:
        load_backbone(str(path), RecformerForSeqRec)
    message = str(error.value)
    assert message.startswith(f"{path}: no config.json beside it") and "\n" not in message
    assert message.endswith("put config.json and the tokenizer files of allenai/longformer-base-4096 next to the .bin")
