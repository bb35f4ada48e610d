"""How well do batches mix the tree? `python -m hmtrain.data.loading.mix --prepared DIR [--batch 16 --batches 60]`

Prints how many of the StepLoader's batches hold a single level-1 node or a single leaf, and the
mean number of distinct level-1 nodes per batch, beside what uniform sampling with replacement gives.
"""
from __future__ import annotations

import argparse

import numpy as np

from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.loading.loader import StepLoader


def _row(name: str, paths: list[np.ndarray]) -> tuple[str, int, int, float]:
    one_node = sum(len(set(p[:, 0].tolist())) == 1 for p in paths)
    one_leaf = sum(len({tuple(r) for r in p.tolist()}) == 1 for p in paths)
    return name, one_node, one_leaf, float(np.mean([len(set(p[:, 0].tolist())) for p in paths]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = PreparedData.open(args.prepared)
    sequences = data.sequences("train")
    loader = StepLoader(data, "train", global_batch=args.batch, micro_batches=1, seed=args.seed)
    shuffled = [micro[0]["paths"].numpy() for (micro, _), _ in zip(loader, range(args.batches))]

    share = np.diff(sequences.level1_offsets) / len(sequences)
    leaves = np.unique(sequences.paths(np.arange(len(sequences))), axis=0, return_counts=True)[1] / len(sequences)
    uniform = ("uniform sample (expected)", args.batches * float((share ** args.batch).sum()),
               args.batches * float((leaves ** args.batch).sum()), float((1 - (1 - share) ** args.batch).sum()))
    print(f"{args.batches} batches of {args.batch} from {len(sequences)} sequences, "
          f"{len(share)} level-1 nodes, {len(leaves)} leaves")
    print(f"{'order':<28}{'one level-1 node':>18}{'one leaf':>10}{'level-1 nodes/batch':>21}")
    for name, node, leaf, mean in (_row("StepLoader (global shuffle)", shuffled), uniform):
        print(f"{name:<28}{node:>18.1f}{leaf:>10.1f}{mean:>21.2f}")


if __name__ == "__main__":
    main()
