"""Sizes of a hierarchical memory bank: pure arithmetic, nothing allocated.

`hmtrain info` prints these for the paper's banks (4.6B..21B parameters), which
are far too big to build just to count them. The formulas are docs/design.md's:
bank = layers * params-per-unit * sum(N_i * m_i), fetched = layers *
params-per-unit * sum(m_i), where the memory kind gives params-per-unit
(hmtrain/memory/kind.py: 3 * d_model for SwiGLU units, gate, up and down rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import lgamma, log

import numpy as np

from hmtrain.config import check_branching
from hmtrain.memory.layout import home_level, pieces_per_row

GRAD_BYTES = 4  # row gradients are fp32 from the backward to the update, whatever the bank's dtype
MASTER_BYTES = 4  # a bank stored in less than fp32 keeps fp32 master rows beside the stored ones


@dataclass(frozen=True)
class LevelSize:
    level: int  # 0-based level index
    nodes: int  # N_i = k_0 * ... * k_i
    units: int  # m_i, hidden units per node per transformer layer
    bank_params: int  # parameters stored for this level (all nodes)
    fetched_params: int  # parameters one sequence fetches from this level


def _check_int(name: str, value: object, *, minimum: int) -> int:
    # bool is an int subclass; a True/False here is always a config mistake
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def validate_tree(branching: Sequence[int], units: Sequence[int]) -> None:
    """Check a (branching, units) pair; raises ValueError naming the bad entry."""
    check_branching(branching)
    if len(branching) != len(units):
        raise ValueError(
            f"branching and units must have one entry per level, got {len(branching)} "
            f"branching factors {tuple(branching)} and {len(units)} unit counts {tuple(units)}"
        )
    for i, m in enumerate(units):
        _check_int(f"units[{i}]", m, minimum=0)


def level_nodes(branching: Sequence[int]) -> list[int]:
    """N_i = k_0 * ... * k_i for every level."""
    nodes, n = [], 1
    for k in branching:
        n *= k
        nodes.append(n)
    return nodes


def memory_sizes(
    *,
    n_layers: int,
    params_per_unit: int,
    branching: Sequence[int],
    units: Sequence[int],
) -> list[LevelSize]:
    """Per-level node count, bank size and fetched size (one entry per level).

    `params_per_unit` parameters per unit per layer (the memory kind's).
    Levels with 0 units appear with 0 params.
    """
    _check_int("n_layers", n_layers, minimum=1)
    _check_int("params_per_unit", params_per_unit, minimum=1)
    validate_tree(branching, units)
    per_unit = n_layers * params_per_unit
    return [
        LevelSize(level=i, nodes=n, units=m, bank_params=per_unit * n * m, fetched_params=per_unit * m)
        for i, (n, m) in enumerate(zip(level_nodes(branching), units))
    ]


@dataclass(frozen=True)
class RankFootprint:
    """Bytes one rank holds for the bank, and bytes one step moves (worst case over ranks)."""

    weights: int  # the stored rows, in the bank's dtype: what fetches read and send
    masters: int  # fp32 master rows of a bank stored in less than fp32 (0 for an fp32 bank); replicated tables'
    #               only for the rank's torch.chunk slice of their rows' pieces (ZeRO-1), as their optimizer state
    optimizer: int  # fp32 exp_avg + exp_avg_sq, and one int64 step count per row
    step_grads: int  # fp32 gradient buffer of the rows a step touches (upper bound)
    fetched: int  # one micro-batch's fetched rows plus their fp32 gradient buffer (upper bound); fetching once
    #               per step, also the step's rows of other ranks and their fp32 gradients, held through it
    moved_gather: int  # bytes sent + received per optimizer step by one rank, gather placement (expected)
    moved_owner: int  # the same for owner placement: the generic row over the world; the replicated levels
    #                   inside each group (nothing with groups of one rank, every rank with one group); with
    #                   groups of several ranks (W > k_1) the sharded rows fetched from the group's other ranks


def _expected_distinct(nodes: int, draws: int) -> float:
    """Expected distinct nodes among `draws` uniform draws over `nodes`."""
    return nodes * (1.0 - (1.0 - 1.0 / nodes) ** draws)


def rank_footprint(*, n_layers: int, params_per_unit: int, branching: Sequence[int], units: Sequence[int],
                   world_size: int, replicate_levels: int, generic: bool, weight_bytes: int, micro_batch: int,
                   global_batch: int, group_size: int = 1, placement: str = "gather",
                   fetch_per_step: bool = False, subtrees_per_group: Sequence[int] | None = None,
                   routed: bool = True) -> RankFootprint:
    """Per-rank bank memory and traffic, assuming a batch's leaves spread uniformly over the tree.
    `weight_bytes`: bytes per stored value (2 for bf16, which adds fp32 masters; 4 for fp32). `group_size`:
    owner placement's ranks per group (hmtrain/parallel/placement.py); a group's sequences route to its
    1/G of each level's nodes, G = world_size / group_size groups. The memory figures are `placement`'s:
    under owner placement a replicated level is stored whole in each group only (1/G of its rows), its
    optimizer state cut among the group's ranks. `fetch_per_step` (parallel.fetch=step): a step's rows of other
    ranks move once, the distinct rows of all its sequences, not once per micro-batch. `subtrees_per_group`:
    owner placement's level-1 subtrees per group (hmtrain/parallel/placement.py; None: k_1 / G each); the
    owner traffic is the mean over ranks, each group's over its own nodes and sequences. `routed`: inside a group
    each rank runs the sequences whose rows it stores first (the loader's routing, `_routed_fetch`); False: the
    even cut in stream order that preceded it (for before/after tables)."""
    validate_tree(branching, units)
    master_bytes = MASTER_BYTES if weight_bytes < 4 else 0
    per_unit = n_layers * params_per_unit
    sequences_per_rank = max(1, global_batch // world_size)
    micro_batches = max(1, sequences_per_rank // micro_batch)
    weights = masters = optimizer = step_grads = fetched = 0
    moved_gather = moved_owner = 0.0
    groups = world_size // group_size
    shares = [branching[0] / groups] * groups if subtrees_per_group is None else list(subtrees_per_group)
    tables = [(n, m, level < replicate_levels, False, level)
              for level, (n, m) in enumerate(zip(level_nodes(branching), units)) if m > 0]
    if generic:
        tables.append((1, sum(units), True, True, None))
    home = home_level(branching, replicate_levels, shares, group_size) if routed else None
    for nodes, m, replicated, is_generic, level in tables:
        row = per_unit * m
        in_groups = replicated and not is_generic and groups > 1  # owner placement keeps it whole per group
        group_nodes = max(nodes / groups, 1.0)  # a group's share of the level's nodes, owner placement
        owned = -(-nodes // world_size)  # the most rows any rank's torch.chunk slice holds (rank 0's)
        rows = nodes if replicated else owned  # a replicated table's stored rows are all on every rank
        sharers = world_size
        if in_groups and placement == "owner":  # the group's 1/G of the rows, state cut among its R ranks
            rows, sharers = -(-nodes // groups), group_size
        pieces, piece = 1, row  # ZeRO-1 cuts a replicated table's rows into pieces when they are too few
        if replicated:
            pieces = pieces_per_row(rows, row, sharers)
            piece, owned = row // pieces, -(-rows * pieces // sharers)
        weights += rows * row * weight_bytes
        masters += owned * piece * master_bytes  # ZeRO-1: a replicated table's state only for its own pieces
        optimizer += owned * (piece * 8 + 8)
        step_grads += min(rows, global_batch) * row * 4
        fetched += min(nodes, micro_batch) * row * (weight_bytes + GRAD_BYTES)
        if replicated:  # ZeRO-1: the touched rows' fp32 gradients reduce-scattered, the updated rows all-gathered
            # in the bank's dtype; a rank sends and receives (W-1)/W of each (the ring's share)
            zero = 2 * (world_size - 1) / world_size * _expected_distinct(nodes, global_batch) * row
            moved_gather += zero * (GRAD_BYTES + weight_bytes)
            if in_groups:  # owner placement: the same among a group's R ranks, over its nodes and sequences
                zero = 2 * (group_size - 1) / group_size * _expected_distinct(group_nodes, global_batch / groups) * row
            moved_owner += zero * (GRAD_BYTES + weight_bytes)
        else:  # rows from the other ranks' shares and their fp32 gradients back, per micro-batch or per step
            draws, times = (sequences_per_rank, 1) if fetch_per_step else (micro_batch, micro_batches)
            remote = _expected_distinct(nodes, draws) * (world_size - 1) / world_size
            moved_gather += 2 * remote * row * (weight_bytes + GRAD_BYTES) * times  # sent and received
            # owner placement: the same within a group, over the group's nodes and its other ranks' shares
            if home is None:
                rows_moved = _owner_fetch(nodes, branching[0], shares, group_size, global_batch, micro_batch,
                                          fetch_per_step)
            else:
                rows_moved = _routed_fetch(branching, level, home, shares, group_size, global_batch, micro_batch,
                                           fetch_per_step)
            moved_owner += rows_moved * row * (weight_bytes + GRAD_BYTES)
            remote_at_all = world_size > 1 if placement == "gather" else group_size > 1
            if fetch_per_step and remote_at_all:  # the step's rows and their gradients, at most one a sequence
                nodes_asked = nodes if placement == "gather" else group_nodes
                fetched += int(min(nodes_asked, sequences_per_rank)) * row * (weight_bytes + GRAD_BYTES)
    return RankFootprint(weights, masters, optimizer, step_grads, fetched, int(moved_gather), int(moved_owner))


def _owner_fetch(nodes: int, subtrees: int, shares: Sequence[float], group_size: int, global_batch: int,
                 micro_batch: int, fetch_per_step: bool) -> float:
    """Rows a rank sends and receives per step for one sharded level under owner placement (rows one way,
    gradients back, so twice the rows fetched), averaged over the groups (equal in ranks). A group with s of
    the k_1 subtrees holds s/k_1 of the level's nodes and gets s/k_1 of the sequences; every rank runs as many
    micro-batches as the busiest needs (the loader's padding), its own sequences spread over them."""
    per_rank = [global_batch * s / subtrees / group_size for s in shares]
    micro_batches = max(1, -(-int(round(max(per_rank))) // micro_batch))
    moved = 0.0
    for share, sequences in zip(shares, per_rank):
        group_nodes = max(nodes * share / subtrees, 1.0)
        draws, times = (sequences, 1) if fetch_per_step else (sequences / micro_batches, micro_batches)
        moved += 2 * _expected_distinct(group_nodes, draws) * (group_size - 1) / group_size * times
    return moved / len(shares)


def _binomial(n: int, p: float) -> np.ndarray:
    """[n + 1] the Binomial(n, p) probabilities of 0..n."""
    if p <= 0.0 or p >= 1.0:
        pmf = np.zeros(n + 1)
        pmf[0 if p <= 0.0 else n] = 1.0
        return pmf
    x = np.arange(n + 1)
    log_choose = np.array([lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1) for k in range(n + 1)])
    return np.exp(log_choose + x * log(p) + (n - x) * log(1.0 - p))


def _chunks(count: int, size: int) -> np.ndarray:
    """[count] the rank in the group (`by_subtree`'s cut) storing each of a group's `count` nodes of a level."""
    return np.arange(count) // max(1, -(-count // size))


def _weights(home_nodes: np.ndarray, count: int, level_nodes_: int) -> np.ndarray:
    """[level_nodes_] how sequences spread uniformly over the group's level-H nodes `home_nodes` (of `count`)
    fall on the group's nodes of another level (children or ancestors of them)."""
    if level_nodes_ >= count:  # descendants: each home node's children, equally
        per = level_nodes_ // count
        weight = np.zeros(level_nodes_)
        weight[(home_nodes[:, None] * per + np.arange(per)).reshape(-1)] = 1.0
    else:  # ancestors: a node's weight is how many of the home nodes lie under it
        weight = np.bincount(home_nodes // (count // level_nodes_), minlength=level_nodes_).astype(float)
    return weight / max(weight.sum(), 1.0)


def _routed_fetch(branching: Sequence[int], level: int, home: int, shares: Sequence[float], group_size: int,
                  global_batch: int, micro_batch: int, fetch_per_step: bool) -> float:
    """`_owner_fetch` with the loader's routing inside a group (hmtrain/data/loading/route.py), for the sharded
    level `level` routed by level `home` (hmtrain/memory/layout.py, `home_level`). Averaged over the groups'
    ranks; `_group_fetch` has the model."""
    k1 = branching[0]
    per_group = [int(np.prod(branching[:lvl + 1])) // k1 for lvl in (level, home)]
    per_rank = [global_batch * s / k1 / group_size for s in shares]
    micro_batches = 1 if fetch_per_step else max(1, -(-int(round(max(per_rank))) // micro_batch))
    moved = {}  # per distinct share: groups alike move alike
    for share in shares:
        if share not in moved:
            nodes, count = (int(per * share) for per in per_group)  # the group's nodes of `level`, of `home`
            moved[share] = _group_fetch(nodes, count, int(round(global_batch * share / k1)), group_size,
                                        micro_batches)
    return sum(moved[share] for share in shares) / len(shares)


def _group_fetch(nodes: int, count: int, n: int, group_size: int, micro_batches: int) -> float:
    """Rows of one level a rank of a routed group sends and receives per step, the mean over its R ranks: the
    group holds `nodes` of the level's nodes and `count` of the routing level's, and runs `n` sequences,
    uniform over its leaves. Rank j stores c_j routing nodes (`by_subtree`'s cut), so X_j, the sequences it
    stores, is Binomial(n, c_j / count); it runs K = min(X_j, q_j) of them (q_j its even share) and sends
    the other O_j = max(0, X_j - q_j) away. Two parts, each exact under that model (sum over x of
    P(X_j = x) times the expected distinct rows given x):
    - its own sequences' rows of the level that another rank stores (none when the counts divide: a rank
      stores its routing nodes' children), sum over such nodes a of 1 - (1 - w_a)^K, w_a their share;
    - the rows of its overflow, which the loader hands out in node order, so mostly to one receiver: the
      distinct nodes of the level among O_j draws from its own nodes, each counted with the chance that the
      receiver, taken as any other rank of the group, neither stores it nor uses it for its own sequences
      (1 for the levels at and below the routing one, whose rows of j's nodes j alone stores and uses);
      plus one row for each receivers' cut inside its overflow that falls between two sequences sharing a
      node (E[receivers] - 1 cuts spread over E[overflow] sequences, and a pair shares a node with the
      chance 1 - (distinct - 1) / (O_j - 1)).
    Against the routing itself, simulated (tests/unit/test_route.py), it is within 7% at every size tried;
    per micro-batch it is rougher (each micro-batch gets K / m and O_j / m sequences, m micro-batches).
    Each row comes one way and its gradient goes back, so a rank's mean traffic is twice the rows. Per
    micro-batch, each of the step's micro-batches gets K and O_j over their count."""
    quota = np.full(group_size, n // group_size)
    quota[:n % group_size] += 1
    stores, stored = _chunks(count, group_size), _chunks(nodes, group_size)
    weights = np.stack([_weights(np.flatnonzero(stores == r), count, nodes) for r in range(group_size)])
    # a receiver r needs no row of node a for its overflow if it stores a or its own sequences use a already
    free = (stored[None, :] == np.arange(group_size)[:, None]) | (weights > 0)  # [receiver, node]
    x = np.arange(n + 1)
    pmf = np.stack([_binomial(n, int((stores == r).sum()) / count) for r in range(group_size)])
    # the receivers' cuts of the overflow (node order): about (receivers - 1) of them over its sequences
    receivers = float((pmf * (x[None, :] < quota[:, None])).sum())
    overflow = float((pmf * np.maximum(0, x[None, :] - quota[:, None])).sum())
    cut_rate = max(receivers - 1.0, 0.0) / overflow if overflow > 0 else 0.0
    moved = 0.0
    for j in range(group_size):
        weight = weights[j]
        elsewhere = weight[stored != j]  # its own sequences' rows another rank stores
        kept = np.minimum(x, quota[j]) / micro_batches
        sent = np.maximum(0, x - quota[j])
        rows = (1.0 - (1.0 - elsewhere)[None, :] ** kept[:, None]).sum(1)
        others = np.delete(np.arange(group_size), j)  # its overflow's receiver, taken as any other rank
        needed = 1.0 - free[others].mean(0)  # [node] the chance that receiver needs the row for it
        hit = 1.0 - (1.0 - weight)[None, :] ** (sent / micro_batches)[:, None]  # [x, node]
        rows += (needed * hit).sum(1)
        # a cut inside its overflow sends a node's row to two receivers when the sequences either side share it
        distinct = (1.0 - (1.0 - weight)[None, :] ** sent[:, None]).sum(1)
        shared = np.where(sent >= 2, 1.0 - (distinct - 1.0) / np.maximum(sent - 1, 1), 0.0)
        cuts = np.minimum(np.maximum(sent - 1, 0), cut_rate * sent)
        rows += cuts * shared * float(needed @ weight) / micro_batches
        moved += 2 * micro_batches * float(pmf[j] @ rows)
    return moved / group_size


@dataclass(frozen=True)
class EvalFootprint:
    """Bytes `eval` / `generate --checkpoint` need for the bank on one process (hmtrain/memory/host_bank.py)."""

    weights: int  # every table's weights, in host memory (no optimizer state)
    fetched: int  # one batch's fetched rows on the device, at most (staged once more on the host)
    largest_table: int  # loading holds one saved chunk in flight beside the weights: at most the largest table


def eval_footprint(*, n_layers: int, params_per_unit: int, branching: Sequence[int], units: Sequence[int],
                   generic: bool, weight_bytes: int, batch: int) -> EvalFootprint:
    """The weights-only bank and the rows a batch of `batch` sequences fetches (every sequence on another
    node, as far as a level has nodes, and the generic row)."""
    validate_tree(branching, units)
    per_unit = n_layers * params_per_unit
    tables = [(nodes, m) for nodes, m in zip(level_nodes(branching), units) if m > 0]
    if generic:
        tables.append((1, sum(units)))
    return EvalFootprint(weights=sum(nodes * per_unit * m for nodes, m in tables) * weight_bytes,
                         fetched=sum(min(nodes, batch) * per_unit * m for nodes, m in tables) * weight_bytes,
                         largest_table=max((nodes * per_unit * m for nodes, m in tables), default=0) * weight_bytes)


def _tables(branching: Sequence[int], units: Sequence[int], replicate_levels: int,
            generic: bool) -> list[tuple[int, int, bool]]:
    """(rows, units per row, replicated) of every table the bank builds, the generic row's last."""
    tables = [(n, m, level < replicate_levels) for level, (n, m) in enumerate(zip(level_nodes(branching), units))
              if m > 0]
    return tables + ([(1, sum(units), True)] if generic else [])


@dataclass(frozen=True)
class StepTransients:
    """Bytes a training step allocates for a moment beside what `RankFootprint` holds (upper bounds), each
    from hmtrain/memory/bank.py's code; they live at different times of a step."""

    fetch: int  # copies made while fetching one micro-batch, beside the layer-major rows (`fetched`)
    grad_return: int  # copies made while returning one micro-batch's row gradients to their owners
    grad_concat: int  # finish_grads' flat fp32 copy of the replicated tables' step gradients, all-reduced


def step_transients(*, n_layers: int, params_per_unit: int, branching: Sequence[int], units: Sequence[int],
                    world_size: int, replicate_levels: int, generic: bool, weight_bytes: int, micro_batch: int,
                    global_batch: int, placement: str, group_size: int = 1) -> StepTransients:
    """The bank's transient buffers of one step, at most, for `placement` (gather | owner; owner with
    `group_size` ranks per group: groups of one read locally, larger ones fetch from their own ranks)."""
    validate_tree(branching, units)
    per_unit = n_layers * params_per_unit
    fetch = grad_return = grad_concat = 0
    for nodes, m, replicated in _tables(branching, units, replicate_levels, generic):
        row = per_unit * m
        fetched = min(nodes, micro_batch)  # distinct rows of one micro-batch
        if replicated or (placement == "owner" and group_size == 1):  # read locally: index_select's copy,
            fetch += fetched * row * weight_bytes  # then the layer-major one
        else:
            # every rank that may ask (all, or the group's), this one too, asks for at most a micro-batch of its rows
            askers = world_size if placement == "gather" else group_size
            served = askers * min(-(-nodes // world_size), micro_batch)
            fetch += 2 * (served + fetched) * row * weight_bytes  # the rows served and their torch.cat, the
            # rows received and their per-table torch.cat, all alive until fetch returns
            grad_return += (2 * fetched + served) * row * GRAD_BYTES  # per-owner slices copied and their
            # torch.cat, and the gradients received
        if replicated and world_size > 1:  # the union of every rank's rows: at most one per sequence
            grad_concat += min(nodes, global_batch) * row * GRAD_BYTES
    return StepTransients(fetch, grad_return, grad_concat)


def bank_checkpoint_bytes(*, n_layers: int, params_per_unit: int, branching: Sequence[int], units: Sequence[int],
                          generic: bool, weight_bytes: int) -> int:
    """Bytes a checkpoint stores for the bank, all ranks together: its stored bytes (docs/design.md), per
    parameter the weight, an fp32 master below fp32 and two fp32 moments (fp32 12, bf16 14), and an int64
    step count per row."""
    validate_tree(branching, units)
    master_bytes = MASTER_BYTES if weight_bytes < 4 else 0
    per_unit = n_layers * params_per_unit
    return sum(nodes * (per_unit * m * (weight_bytes + master_bytes + 8) + 8)
               for nodes, m, _ in _tables(branching, units, 0, generic))
