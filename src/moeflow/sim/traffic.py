"""Where the rows go: per-expert loads, expert placement (contiguous or EPLB replicas), rows per rank pair.

Shape legend: E = experts, P = EP group size, S = physical expert slots (P * slots per rank), N = assignments.
Two levels of detail:
- exact: from a routing trace (each rank's kept (token, expert) pairs) the rows each rank sends each peer in
  each mode, by the dispatcher's own rules (`parallel/ep_dispatch.py`); equal to its `CommStats`;
- expected: from per-expert load shares only (what metrics.jsonl records), assuming every rank routes like the
  whole batch; the dedup row count then needs P(token hits rank r), computed from the routing shape.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeflow.config import expert_capacity
from moeflow.sim.spec import ModelShape, SimError, Traffic

META_BYTES = 12  # dedup: an int64 local index and an fp32 routing weight travel with every (token, expert) row


# ------------------------------------------------------------------------------------------- loads
def layer_loads(traffic: Traffic, model: ModelShape) -> list[np.ndarray]:
    """Load share per expert [E] (sums to 1) for each MoE layer: one array per layer, or one shared by all."""
    e = model.num_experts
    rng = np.random.default_rng(traffic.seed)
    if traffic.kind == "uniform":
        return [np.full(e, 1.0 / e)]
    if traffic.kind == "zipf":
        w = 1.0 / np.arange(1, e + 1) ** traffic.s
        return [_norm(rng.permutation(w))]
    if traffic.kind == "lognormal":
        return [_norm(rng.lognormal(0.0, traffic.sigma, e))]
    rows = traffic.tokens_per_expert if traffic.kind == "loads" else metrics_loads(traffic.path, traffic.step)
    if rows and not isinstance(rows[0], (list, tuple)):
        rows = [rows]
    out = []
    for i, r in enumerate(rows):
        a = np.asarray(r, dtype=np.float64)
        if a.shape != (e,) or not np.all(np.isfinite(a)) or (a < 0).any() or a.sum() <= 0:
            raise SimError(f"workload traffic layer {i}: tokens_per_expert must be {e} non-negative counts "
                           f"(model has {e} experts) with a positive sum, got shape {a.shape}")
        out.append(_norm(a))
    if len(out) not in (1, model.moe_layers):
        raise SimError(f"workload traffic gives {len(out)} layers of loads but the model has {model.moe_layers} "
                       "MoE layers; give one list (used for every layer) or one per MoE layer")
    return out


def _norm(a: np.ndarray) -> np.ndarray:
    """Shares summing to 1."""
    return a / a.sum()


def metrics_loads(path: str, step: int = -1) -> list[list[float]]:
    """Per-layer tokens_per_expert of one train record of a moeflow metrics.jsonl (-1: the last one)."""
    p = Path(path)
    if not p.is_file():
        raise SimError(f"metrics file {path!r} does not exist; point workload.traffic.path at a run's metrics.jsonl")
    recs = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
        if isinstance(r, dict) and r.get("kind") == "train" and r.get("layers"):
            recs.append(r)
    if not recs:
        raise SimError(f"metrics file {path!r} has no train record with per-layer tokens_per_expert")
    pick = [r for r in recs if r.get("step") == step] if step >= 0 else recs[-1:]
    if not pick:
        raise SimError(f"metrics file {path!r} has no train record for step {step}; steps: "
                       f"{recs[0].get('step')}..{recs[-1].get('step')}")
    return [lay["tokens_per_expert"] for lay in pick[0]["layers"]]


# ------------------------------------------------------------------------------------------- placement
@dataclass
class Placement:
    """Physical slots: slot s on rank s // slots_per_rank holds logical expert `phy2log[s]`; loads split evenly."""

    phy2log: np.ndarray  # [S]
    slots_per_rank: int
    count_E: np.ndarray  # replicas of each expert [E]

    def rank_share(self, load_E: np.ndarray) -> np.ndarray:
        """Share of all rows each rank receives [P] (a replicated expert's rows split evenly over its copies)."""
        slot = load_E[self.phy2log] / self.count_E[self.phy2log]
        return slot.reshape(-1, self.slots_per_rank).sum(1)


def contiguous(num_experts: int, ep: int) -> Placement:
    """moeflow's placement: rank p holds experts [p*L, (p+1)*L)."""
    return Placement(np.arange(num_experts), num_experts // ep, np.ones(num_experts, dtype=np.int64))


def replicate_experts(load_E: np.ndarray, num_slots: int) -> np.ndarray:
    """Replicas per expert: one each, then each extra slot to the expert with the largest load per replica."""
    e = load_E.size
    if num_slots < e:
        raise SimError(f"{num_slots} slots cannot hold {e} experts")
    cnt = np.ones(e, dtype=np.int64)
    heap = [(-float(load_E[i]), i) for i in range(e)]
    heapq.heapify(heap)
    for _ in range(num_slots - e):
        _, i = heapq.heappop(heap)
        cnt[i] += 1
        heapq.heappush(heap, (-float(load_E[i]) / cnt[i], i))
    return cnt


def balanced_packing(weight: np.ndarray, packs: int) -> np.ndarray:
    """Pack of each item: heaviest first into the lightest pack that still has room (n/packs items each)."""
    n = weight.size
    if n % packs:
        raise SimError(f"{n} slots do not split evenly over {packs} ranks")
    cap = n // packs
    pack_of = np.empty(n, dtype=np.int64)
    heap = [(0.0, p) for p in range(packs)]
    filled = np.zeros(packs, dtype=np.int64)
    for i in np.argsort(-weight, kind="stable"):
        w, p = heapq.heappop(heap)
        pack_of[i] = p
        filled[p] += 1
        if filled[p] < cap:
            heapq.heappush(heap, (w + float(weight[i]), p))
    return pack_of


def eplb(load_E: np.ndarray, ep: int, extra_per_rank: int) -> Placement:
    """DeepSeek EPLB's global policy: replicate into ep*(E/ep + extra) slots, pack slots onto ranks by load."""
    e = load_E.size
    spr = e // ep + extra_per_rank
    cnt = replicate_experts(load_E, ep * spr)
    logical = np.repeat(np.arange(e), cnt)
    pack = balanced_packing(load_E[logical] / cnt[logical], ep)
    order = np.argsort(pack, kind="stable")
    return Placement(logical[order], spr, cnt)


def _pack_rows(weight_XN: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's balanced_packing per row: (pack of each item, its position in the pack) [X, N]."""
    x, n = weight_XN.shape
    per = n // packs
    if per == 1:
        ident = np.tile(np.arange(n), (x, 1))
        return ident, np.zeros_like(ident)
    pack = np.full((x, n), -1, dtype=np.int64)
    pos = np.full((x, n), -1, dtype=np.int64)
    for i in range(x):
        weights, items = [0.0] * packs, [0] * packs
        for item in np.argsort(-weight_XN[i], kind="stable"):
            p = min((q for q in range(packs) if items[q] < per), key=weights.__getitem__)
            pack[i, item], pos[i, item] = p, items[p]
            weights[p] += float(weight_XN[i, item])
            items[p] += 1
    return pack, pos


def _replicate_rows(weight_XN: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's replicate_experts per row: (logical item of each slot [X, slots], copies of each item [X, N])."""
    x, n = weight_XN.shape
    phy = np.tile(np.arange(slots), (x, 1))
    cnt = np.ones((x, n), dtype=np.int64)
    for s in range(n, slots):
        best = np.argmax(weight_XN / cnt, axis=1)  # first index on ties, as torch.max
        phy[:, s] = best
        cnt[np.arange(x), best] += 1
    return phy, cnt


def _inverse(perm_XN: np.ndarray) -> np.ndarray:
    """Row-wise inverse permutation."""
    inv = np.empty_like(perm_XN)
    np.put_along_axis(inv, perm_XN, np.tile(np.arange(perm_XN.shape[1]), (perm_XN.shape[0], 1)), axis=1)
    return inv


def eplb_hierarchical(weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek EPLB's hierarchical policy (deepseek-ai/EPLB eplb.py, seed003 §1.1): (phy2log [L, R], logcnt [L, E]).

    Expert groups are packed onto nodes by load, each node replicates its experts into R/N slots, and the slots
    are packed onto the node's GPUs. Needs E % groups == 0, groups % nodes == 0, gpus % nodes == 0, R % gpus == 0.
    """
    w = np.asarray(weight_LE, dtype=np.float64)
    layers, e = w.shape
    if e % num_groups or num_groups % num_nodes or num_gpus % num_nodes or num_replicas % num_gpus:
        raise SimError(f"EPLB hierarchical policy needs experts ({e}) % groups ({num_groups}), groups % nodes "
                       f"({num_nodes}), gpus ({num_gpus}) % nodes and replicas ({num_replicas}) % gpus all zero")
    group_size, groups_per_node = e // num_groups, num_groups // num_nodes
    per_gpu = num_replicas // num_gpus
    # 1: groups onto nodes
    g_pack, g_pos = _pack_rows(w.reshape(layers, num_groups, group_size).sum(-1), num_nodes)
    log2mlog = (((g_pack * groups_per_node + g_pos) * group_size)[:, :, None] + np.arange(group_size)).reshape(
        layers, e)
    mlog2log = _inverse(log2mlog)
    # 2: replicas inside each node
    per_node_w = np.take_along_axis(w, mlog2log, axis=1).reshape(-1, e // num_nodes)
    phy2mlog, mlogcnt = _replicate_rows(per_node_w, num_replicas // num_nodes)
    # 3: slots onto the node's GPUs
    slot_w = np.take_along_axis(per_node_w / mlogcnt, phy2mlog, axis=1)
    pack, pos = _pack_rows(slot_w, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + pos)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1)
                 + np.arange(0, e, e // num_nodes)[None, :, None]).reshape(layers, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, axis=1)
    return phy2log, logcnt


# ------------------------------------------------------------------------------------------- hits (dedup)
def _miss(frac: np.ndarray, n: int, draws: float) -> np.ndarray:
    """P(none of `draws` picks without replacement among n equal items lands in a part holding `frac` of them)."""
    out = np.ones_like(frac)
    whole = int(math.floor(draws))
    for i in range(whole):
        out = out * np.clip((n * (1 - frac) - i) / (n - i), 0.0, 1.0)
    rest = draws - whole
    if rest > 0:  # a fractional draw: interpolate geometrically
        out = out * np.clip((n * (1 - frac) - whole) / max(n - whole, 1), 0.0, 1.0) ** rest
    return out


def hit_prob(share_P: np.ndarray, model: ModelShape, ep: int, hierarchical: bool) -> np.ndarray:
    """P(a token sends at least one row to rank r) [P], from the ranks' load shares and the routing shape.

    Exact for uniform loads (draws without replacement: 1 - C(E - L, k) / C(E, k)); for skewed loads the share
    stands in for the fraction of experts. Grouped routing (a token uses g of G expert groups) first picks the
    groups, then k/g experts inside each.
    """
    e, k = model.num_experts, model.top_k
    g_all, g_tok = (ep, 1) if hierarchical else (model.route_groups, model.route_groups_per_token)
    if g_all == 1:
        return 1.0 - _miss(share_P, e, k)
    per_group = e // g_all
    per_rank = e // ep
    if per_group <= per_rank:  # a rank holds whole groups: it is hit iff one of its groups is picked
        return 1.0 - _miss(share_P, g_all, g_tok)
    # a group spans ranks: P(its group picked) * P(hit among k/g draws inside the group)
    ranks_per_group = per_group // per_rank
    group_share = share_P.reshape(-1, ranks_per_group).sum(1)
    picked = 1.0 - _miss(group_share, g_all, g_tok)
    within = share_P / np.repeat(np.maximum(group_share, 1e-300), ranks_per_group)
    return np.repeat(picked, ranks_per_group) * (1.0 - _miss(within, per_group, k / g_tok))


# ------------------------------------------------------------------------------------------- exact rows
@dataclass
class ExactRows:
    """Rows (of D values) and metadata bytes each EP rank sends each peer in one token all-to-all [P, P]."""

    rows_PP: np.ndarray
    meta_PP: np.ndarray

    def remote_bytes(self, row_bytes: int) -> np.ndarray:
        """Bytes each rank sends to other ranks (the CommStats.remote_bytes_sent of every rank) [P]."""
        b = self.rows_PP * row_bytes + self.meta_PP
        return b.sum(1) - np.diag(b)


def exact_rows(expert_ids: list[np.ndarray], token_ids: list[np.ndarray], num_experts: int, mode: str,
               slots: int = 0, place: Placement | None = None) -> ExactRows:
    """Rows per (sender, receiver) for each rank's kept assignments, by the dispatcher's rules.

    `expert_ids[p]`, `token_ids[p]`: rank p's kept assignments. variable: one row per assignment to the rank
    holding its expert; padded: `slots` rows per expert from every rank (zeros included); dedup: one row per
    (token, destination rank) plus META_BYTES per assignment.
    """
    p = len(expert_ids)
    place = place or contiguous(num_experts, p)
    if place.count_E.max() > 1:
        raise SimError("exact rows need one copy per expert (moeflow's dispatcher has no replicas yet)")
    rank_of_E = np.empty(num_experts, dtype=np.int64)
    rank_of_E[place.phy2log] = np.arange(place.phy2log.size) // place.slots_per_rank
    rows = np.zeros((p, p), dtype=np.int64)
    meta = np.zeros((p, p), dtype=np.int64)
    for s in range(p):
        dest = rank_of_E[np.asarray(expert_ids[s], dtype=np.int64)]
        per_dest = np.bincount(dest, minlength=p)
        if mode == "variable":
            rows[s] = per_dest
        elif mode == "padded":
            rows[s] = place.slots_per_rank * slots
        elif mode == "dedup":
            pairs = np.unique(np.asarray(token_ids[s], dtype=np.int64) * p + dest)
            rows[s] = np.bincount(pairs % p, minlength=p)
            meta[s] = per_dest * META_BYTES
        else:
            raise SimError(f"unknown mode {mode!r}; choose variable, padded or dedup")
    return ExactRows(rows, meta)


def padded_slots(model: ModelShape, tokens: int, groups: int = 1, capacity_factor: float | None = None) -> int:
    """Slots per expert a rank sends in padded mode: capacity per routing group x groups (ops/capacity rules)."""
    cf = capacity_factor if capacity_factor is not None else model.capacity_factor
    if cf is None:
        raise SimError("mode padded needs a capacity factor; set model.capacity_factor or use mode variable")
    return expert_capacity(cf, model.top_k, tokens // groups, model.num_experts) * groups
