"""The α-β cost model: per MoE layer the rows between ranks by tier, a2a and expert time, and the step time.

Shape legend: P = EP group size, J = domains the EP group spans, E = experts.
Ranks: pipeline stage outermost, then data-parallel ranks; EP groups are contiguous blocks of `ep` ranks inside
a stage (moeflow's `ParallelDims`), nodes are `ranks_per_node` consecutive ranks, domains `nodes_per_domain`
consecutive nodes. Every EP group sees the same traffic, so one is simulated. Each rank is assumed to route like
the whole batch (rows to rank r per token = k x its share), which makes every quantity O(J * P) per layer:
sums over a rank's node / domain / the rest, never a P x P loop (`rows_matrix` is the P x P form, for tests).

One token all-to-all, rank s, tier t in (node, domain, wan):
    t_t(s) = latency_t + per_peer_t * peers_t + max(sent_t(s), received_t(s)) * row_bytes / beta_t
    a2a = launch + max over s of sum_t t_t(s)   (max_t with tier_overlap: a two-tier a2a whose tiers run at once)
A link shared by a node or domain (shared_by) carries the unit's total: t = max(sum sent, sum received) / beta.
Experts: a rank's time is rows_received * 2 * weights_per_expert / gemm_rate forward, twice that backward; the
slowest rank gates the combine. Overlap degree d pipelines dispatch, experts, combine in d chunks; the two
all-to-alls share the network (comm = d * latencies + bytes / beta), the experts the cores (c):
    t = max(comm + c / d, c + first dispatch chunk + last combine chunk)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeflow.sim.spec import TIER_NAMES, Cluster, Layout, ModelShape, SimError, Workload
from moeflow.sim.traffic import META_BYTES, Placement, contiguous, eplb, hit_prob, layer_loads, padded_slots

# token all-to-alls per MoE layer per step (fwd dispatch, fwd combine, bwd of each) and the small ones:
# variable: one count exchange; padded: one health-flag exchange; dedup: counts, then per-assignment indices (8 B)
# and weights (4 B) forward and the weights' gradient (4 B) backward
SMALL_A2A = {"variable": 1, "padded": 1, "dedup": 4}
META_PER_STEP = {"variable": 0, "padded": 0, "dedup": META_BYTES + 4}
MATRIX_MAX_RANKS = 64  # EP groups up to this size get their P x P byte matrix in the JSON output


@dataclass
class Geometry:
    """How the EP group and the data-parallel groups sit on nodes and domains."""

    world: int
    dp: int  # ranks per pipeline stage
    ep: int
    per_node: int  # EP-group ranks per node
    per_domain: int  # EP-group ranks per domain
    domains: int  # domains the EP group spans (J)

    @property
    def peers(self) -> dict[str, int]:
        """Peers of one rank in its EP group on each tier."""
        return {"node": self.per_node - 1, "domain": self.per_domain - self.per_node, "wan": self.ep - self.per_domain}


def geometry(cluster: Cluster, layout: Layout, world: int) -> Geometry:
    """Check divisibility and place the groups; a SimError names the mismatch and what would fit."""
    if world % layout.pp:
        raise SimError(f"world={world} ranks are not divisible by pp={layout.pp}; choose pp from the divisors")
    dp = world // layout.pp
    if dp % layout.ep:
        raise SimError(f"ep={layout.ep} must divide the data-parallel size {dp} (= world {world} / pp {layout.pp})")
    rpn, rpd = cluster.ranks_per_node, cluster.ranks_per_domain
    if world > rpn and world % rpn:
        raise SimError(f"world={world} is not a whole number of nodes of {rpn} ranks")
    for size, unit, name in ((rpn, "node", "ranks_per_node"), (rpd, "domain", "ranks per domain")):
        if world > size and not (layout.ep % size == 0 or size % layout.ep == 0):
            raise SimError(f"ep={layout.ep} and {name}={size} do not nest: an EP group must fill whole "
                           f"{unit}s or fit evenly inside one")
    per_node, per_domain = min(layout.ep, rpn), min(layout.ep, rpd)
    return Geometry(world, dp, layout.ep, per_node, per_domain, layout.ep // per_domain)


# ------------------------------------------------------------------------------------------- one a2a
@dataclass
class A2ATime:
    """One token all-to-all: the slowest rank's time and its split by tier, plus volumes (for reports)."""

    time: float
    alpha: float  # latency part of the slowest rank
    tiers: dict[str, float]  # time per tier on the slowest rank
    max_rows_out: float  # most rows any rank sends to other ranks

    def scaled(self, bytes_factor: float, extra_alpha: float = 0.0) -> float:
        """The time with the bandwidth part multiplied by `bytes_factor` and `extra_alpha` seconds of latency."""
        return self.alpha + extra_alpha + (self.time - self.alpha) * bytes_factor


def tier_volumes(rows_JP: np.ndarray, g: Geometry) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(sent, received) rows per rank [P] on each tier, when every rank of domain j sends rows_JP[j, r] to rank r."""
    p, n, m = g.ep, g.per_node, g.per_domain
    dom_of = np.arange(p) // m
    own = rows_JP[dom_of, np.arange(p)]  # rows each rank sends itself (not on the wire)
    node_sum = np.stack([rows_JP[j].reshape(-1, n).sum(1) for j in range(g.domains)])  # [J, P/n]
    dom_sum = np.stack([rows_JP[j].reshape(-1, m).sum(1) for j in range(g.domains)])  # [J, J]
    total = rows_JP.sum(1)  # [J]
    node_of = np.arange(p) // n
    in_node = node_sum[dom_of, node_of]
    in_dom = dom_sum[dom_of, dom_of]
    sent = {"node": in_node - own, "domain": in_dom - in_node, "wan": total[dom_of] - in_dom}
    from_others = rows_JP.sum(0) - rows_JP[dom_of, np.arange(p)]  # one sender per other domain
    recv = {"node": (n - 1) * own, "domain": (m - n) * own, "wan": m * from_others}
    return sent, recv


def a2a_time(rows_JP: np.ndarray, g: Geometry, cluster: Cluster, row_bytes: float, tier_overlap: bool,
             meta_JP: np.ndarray | None = None) -> A2ATime:
    """α-β time of one token all-to-all (see the module docstring); `meta_JP`: extra bytes (not rows)."""
    sent, recv = tier_volumes(rows_JP, g)
    rows_out = sum(sent[t] for t in TIER_NAMES)
    if meta_JP is not None:
        ms, mr = tier_volumes(meta_JP, g)
        sent = {t: v * row_bytes + ms[t] for t, v in sent.items()}
        recv = {t: v * row_bytes + mr[t] for t, v in recv.items()}
    else:
        sent = {t: v * row_bytes for t, v in sent.items()}
        recv = {t: v * row_bytes for t, v in recv.items()}
    per_tier, alphas = {}, np.zeros(g.ep)
    for name in TIER_NAMES:
        peers = g.peers[name]
        if peers == 0:
            continue
        tier = cluster.tier(name)
        a = (tier.latency_us + tier.per_peer_us * peers) * 1e-6
        alphas = np.maximum(alphas, a) if tier_overlap else alphas + a
        if tier.shared_by == "rank":
            per_tier[name] = a + np.maximum(sent[name], recv[name]) / (tier.bandwidth_GBps * 1e9)
            continue
        # one link per node/domain: it carries the whole unit's traffic (every EP group in it sends at once),
        # so a hot receiver does not slow it more than its share of the total
        unit = cluster.ranks_per_node if tier.shared_by == "node" else cluster.ranks_per_domain
        in_group = min(unit, g.ep)
        copies = unit / in_group
        out_u = sent[name].reshape(-1, in_group).sum(1) * copies
        in_u = recv[name].reshape(-1, in_group).sum(1) * copies
        per_tier[name] = a + np.repeat(np.maximum(out_u, in_u), in_group) / (tier.bandwidth_GBps * 1e9)
    if not per_tier:
        return A2ATime(0.0, 0.0, {}, 0.0)
    stack = np.stack(list(per_tier.values()))
    launch = cluster.launch_us * 1e-6
    per_rank = (stack.max(0) if tier_overlap else stack.sum(0)) + launch
    s = int(np.argmax(per_rank))
    return A2ATime(float(per_rank[s]), float(alphas[s]) + launch, {t: float(v[s]) for t, v in per_tier.items()},
                   float(rows_out.max()))


def small_a2a_time(g: Geometry, cluster: Cluster, tier_overlap: bool) -> float:
    """A latency-only all-to-all (counts, flags)."""
    lat = [(cluster.tier(t).latency_us + cluster.tier(t).per_peer_us * g.peers[t]) * 1e-6 for t in TIER_NAMES
           if g.peers[t]]
    return ((max(lat) if tier_overlap else sum(lat)) + cluster.launch_us * 1e-6) if lat else 0.0


def rows_matrix(rows_JP: np.ndarray, g: Geometry) -> np.ndarray:
    """The P x P rows matrix [sender, receiver] that `tier_volumes` sums implicitly (small P only)."""
    return rows_JP[np.arange(g.ep) // g.per_domain]


def tier_matrix(g: Geometry) -> list[list[str]]:
    """The tier each (sender, receiver) pair of the EP group uses: self, node, domain or wan."""
    node, dom = np.arange(g.ep) // g.per_node, np.arange(g.ep) // g.per_domain
    return [["self" if s == r else "node" if node[s] == node[r] else "domain" if dom[s] == dom[r] else "wan"
             for r in range(g.ep)] for s in range(g.ep)]


def all_reduce_time(nbytes: float, sizes: dict[str, int], cluster: Cluster) -> float:
    """Hierarchical ring all-reduce: per tier 2(n-1)/n of the bytes left at that level, plus 2(n-1) latencies."""
    t, left = 0.0, float(nbytes)
    for name in TIER_NAMES:
        n = sizes.get(name, 1)
        if n <= 1:
            continue
        t += 2 * (n - 1) / n * left / cluster.rank_bandwidth(name) + 2 * (n - 1) * cluster.tier(name).latency_us * 1e-6
        left /= n  # reduce-scatter inside the lower tier leaves 1/n of the data per rank for the next one
    return t


def group_sizes(members: int, stride: int, cluster: Cluster) -> dict[str, int]:
    """A group of `members` ranks `stride` apart: members per node, nodes per domain, domains (for all_reduce_time)."""
    per_node = min(members, max(1, cluster.ranks_per_node // stride))
    per_dom = min(members, max(1, cluster.ranks_per_domain // stride))
    return {"node": per_node, "domain": per_dom // per_node, "wan": members // per_dom}


# ------------------------------------------------------------------------------------------- one MoE layer
@dataclass
class LayerCost:
    """One MoE layer for one microbatch on one EP group (seconds) and what explains it."""

    dispatch: A2ATime
    combine: A2ATime
    small: float  # latency-only exchanges per step (fwd + bwd)
    meta_bytes: float  # dedup metadata bytes per rank per step, sent with extra exchanges
    expert_fwd: float  # slowest rank
    expert_fwd_mean: float
    rows_max: float  # rows received by the hottest rank
    rows_mean: float
    migrated: int  # experts copied into other domains
    migrate_sync: float  # seconds per step keeping the copies in step (expert path)
    meta_time: float = 0.0  # dedup: bandwidth part of the index/weight exchanges per step
    dropped: float = 0.0  # share of assignments over capacity
    matrix: dict[str, Any] = field(default_factory=dict)  # small EP groups: bytes [sender][receiver] and tiers
    fwd: float = 0.0
    bwd: float = 0.0
    a2a_fwd: float = 0.0
    a2a_bwd: float = 0.0
    tiers: dict[str, float] = field(default_factory=dict)

    @property
    def imbalance(self) -> float:
        """Hottest rank's rows / mean rows."""
        return self.rows_max / self.rows_mean if self.rows_mean else 1.0


def _pipelined(a1: A2ATime, c: float, a3: A2ATime, d: int) -> float:
    """dispatch -> experts -> combine in d chunks; both all-to-alls share the network, experts the cores.

    Each chunk pays every latency again. Whichever resource is busier sets the pace, plus the part of the other
    that cannot overlap (the first dispatch and last combine chunk, or one expert chunk).
    """
    if d == 1:
        return a1.time + c + a3.time
    comm = d * (a1.alpha + a3.alpha) + (a1.time - a1.alpha) + (a3.time - a3.alpha)
    fill = a1.scaled(1 / d) + a3.scaled(1 / d)
    return max(comm + c / d, c + fill)


def layer_cost(model: ModelShape, cluster: Cluster, layout: Layout, g: Geometry, load_E: np.ndarray,
               tokens: int, act_bytes: int, grad_bytes: int) -> LayerCost:
    """Rows, a2a and expert time of one MoE layer for `tokens` tokens per rank."""
    e, k, d = model.num_experts, model.top_k, model.d_model
    if layout.hierarchical:
        # one cluster per rank: the token's k experts live on one rank; cluster loads follow the expert loads
        if e // layout.ep < k:
            raise SimError(f"hierarchical routing with one cluster per rank needs num_experts/ep >= top_k; "
                           f"{e}/{layout.ep} < {k}")
    dropped = 0.0
    if model.capacity_factor is not None:
        # each rank routes its own tokens against C = cf k T / E slots per expert: an expert keeps at most cf/E
        # of the assignments (every rank routing like the batch); the rest are dropped (residual path)
        load_E = np.minimum(load_E, model.capacity_factor / e)
        dropped = float(max(0.0, 1.0 - load_E.sum()))
    place: Placement = eplb(load_E, layout.ep, layout.replicas) if layout.replicas else contiguous(e, layout.ep)
    migrate = np.zeros(e, dtype=bool)
    if layout.migrate and g.domains > 1:
        # break-even (seed003 §4), bytes per direction of a domain's link per step: n tokens from a remote
        # domain cost 2 n D b_act (dispatch and combine-gradient out, combine and dispatch-gradient in), a copy
        # 2 (J-1)/J P_e b_grad / K (ring all-reduce of its gradient over the J copies, every K steps); J = 2,
        # K = 1: move when n > P_e / (2 D), the note's 1.5 H for SwiGLU experts
        n_dom = tokens * g.per_domain * k * load_E
        data = 2 * n_dom * d * act_bytes
        expert = 2 * (g.domains - 1) / g.domains * model.expert_params * grad_bytes / layout.migrate_every
        migrate = data > expert
    share_a = place.rank_share(np.where(migrate, 0.0, load_E))
    share_b = place.rank_share(np.where(migrate, load_E, 0.0))
    shadow = share_b.reshape(g.domains, g.per_domain).sum(0)  # migrated share served in every domain, by position
    m_JP = np.tile(share_a, (g.domains, 1))
    for j in range(g.domains):
        m_JP[j, j * g.per_domain:(j + 1) * g.per_domain] += shadow
    meta = None
    if layout.mode == "variable":
        rows = tokens * k * m_JP
        recv_rows = rows
    elif layout.mode == "padded":
        slots = padded_slots(model, tokens)
        rows = np.full_like(m_JP, place.slots_per_rank * slots, dtype=np.float64)
        recv_rows = rows
    else:
        rows = np.stack([tokens * hit_prob(m_JP[j], model, layout.ep, layout.hierarchical)
                         for j in range(g.domains)])
        meta = tokens * k * m_JP * META_PER_STEP["dedup"]
        recv_rows = tokens * k * m_JP  # the receiver still runs every (token, expert) row
    row_bytes = d * act_bytes
    disp = a2a_time(rows, g, cluster, row_bytes, layout.tier_overlap)
    comb = disp  # the combine mirrors the dispatch
    meta_t = 0.0
    meta_bytes = 0.0
    if meta is not None:
        mt = a2a_time(meta, g, cluster, 1.0, layout.tier_overlap)
        meta_t, meta_bytes = mt.time - mt.alpha, float(meta.max())
    small = SMALL_A2A[layout.mode] * small_a2a_time(g, cluster, layout.tier_overlap) + meta_t
    per_rank = g.per_domain * recv_rows.sum(0)  # every sender of each domain sends rows_JP[j, r]
    flops_fwd = 2.0 * model.expert_params * per_rank
    rate = cluster.gemm_tflops * 1e12
    slowest = float(flops_fwd.max() / rate)
    if cluster.node_compute_ranks:
        # processor sharing on each node: the busiest rank alone, or the node's total over its compute
        node_total = flops_fwd.reshape(-1, g.per_node).sum(1) * (cluster.ranks_per_node / g.per_node)
        slowest = max(slowest, float(node_total.max() / (cluster.node_compute_ranks * rate)))
    sync = 0.0
    if migrate.any():
        sync = all_reduce_time(float(migrate.sum()) * model.expert_params * grad_bytes / layout.migrate_every,
                               {"wan": g.domains}, cluster) / g.per_domain  # the domain's ranks share the copies
    lc = LayerCost(disp, comb, small, meta_bytes, slowest, float(flops_fwd.mean() / rate),
                   float(per_rank.max()), float(per_rank.mean()), int(migrate.sum()), sync, meta_t, dropped)
    if g.ep <= MATRIX_MAX_RANKS:
        lc.matrix = {"dispatch_bytes": (rows_matrix(rows, g) * row_bytes).round().tolist(),
                     "tiers": tier_matrix(g)}
    lc.fwd = _pipelined(disp, lc.expert_fwd, comb, layout.overlap)
    lc.bwd = _pipelined(comb, 2 * lc.expert_fwd, disp, layout.overlap)
    lc.a2a_fwd = lc.a2a_bwd = disp.time + comb.time
    lc.tiers = {t: 4 * v for t, v in disp.tiers.items()}
    return lc


def moe_layer_step(model: ModelShape, cluster: Cluster, layout: Layout, load_E: np.ndarray, tokens: int,
                   value_bytes: int = 4) -> dict[str, float]:
    """One MoELayer alone, as benchmarks/ep.py times it (EP = world, fp32): fwd + bwd + gradient all-reduce.

    Also `token_a2a`: the row-carrying exchanges (the ones `collectives.all_to_all` makes: 4 token all-to-alls,
    and for dedup the index and weight exchanges), for comparison with their measured time.
    """
    g = geometry(cluster, layout, layout.ep)
    lc = layer_cost(model, cluster, layout, g, load_E, tokens, value_bytes, value_bytes)
    rate = cluster.gemm_tflops * 1e12
    router = 3 * 2 * tokens * model.d_model * model.num_experts / rate
    sync = all_reduce_time(model.num_experts * model.d_model * value_bytes, group_sizes(g.dp, 1, cluster), cluster)
    step = lc.fwd + lc.bwd + lc.small + router + sync + cluster.layer_overhead_us * 1e-6
    meta_latency = 3 * small_a2a_time(g, cluster, layout.tier_overlap) if layout.mode == "dedup" else 0.0
    return {"step": step, "token_a2a": lc.a2a_fwd + lc.a2a_bwd + meta_latency + lc.meta_time,
            "expert": 3 * lc.expert_fwd, "router": router, "grad_sync": sync, "small": lc.small,
            "rows_max": lc.rows_max}


# ------------------------------------------------------------------------------------------- the step
@dataclass
class Prediction:
    """Predicted step time of one layout and its breakdown (seconds per step; memory in bytes per rank)."""

    layout: Layout
    step: float
    breakdown: dict[str, float]  # expert, dense, a2a, small_a2a, overhead, grad_sync, migrate_sync, bubble, p2p,
    # and overlap_saved (subtracted: what the overlap degree hides)
    a2a_tiers: dict[str, float]
    memory: dict[str, float]
    imbalance: float
    migrated: int
    fits: bool
    world: int
    dropped: float = 0.0  # mean share of assignments over capacity (capacity_factor set)
    hot_layer: dict[str, Any] = field(default_factory=dict)  # the busiest MoE layer, per phase (one microbatch)

    @property
    def memory_total(self) -> float:
        """Bytes per rank, all kinds."""
        return sum(self.memory.values())

    @property
    def a2a_share(self) -> float:
        """Share of the step spent in token all-to-alls (latency-only exchanges included)."""
        return (self.breakdown["a2a"] + self.breakdown["small_a2a"]) / self.step if self.step else 0.0

    @property
    def dominant(self) -> str:
        """The largest term of the breakdown."""
        return max((k for k in self.breakdown if k != "overlap_saved"), key=lambda k: self.breakdown[k])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {"layout": self.layout.to_dict(), "label": self.layout.label(), "step_s": self.step,
                "breakdown_s": self.breakdown, "a2a_tiers_s": self.a2a_tiers, "a2a_share": self.a2a_share,
                "memory_GiB": {k: v / 2**30 for k, v in self.memory.items()}, "imbalance": self.imbalance,
                "migrated_experts_per_layer": self.migrated, "fits": self.fits, "dominant": self.dominant,
                "dropped": self.dropped, "hot_layer": self.hot_layer,
                "world": self.world}


def _phases(lc: LayerCost) -> dict[str, Any]:
    """One MoE layer's phases: each token all-to-all (time by tier; backward repeats both), experts, rows."""
    return {"forward_s": lc.fwd, "backward_s": lc.bwd, "dispatch_s": lc.dispatch.time,
            "dispatch_tiers_s": lc.dispatch.tiers, "combine_s": lc.combine.time, "combine_tiers_s": lc.combine.tiers,
            "small_exchanges_s": lc.small, "expert_forward_s": lc.expert_fwd, "rows_max": lc.rows_max,
            "rows_mean": lc.rows_mean, "max_rows_sent": lc.dispatch.max_rows_out, "migrated": lc.migrated,
            **({"matrix": lc.matrix} if lc.matrix else {})}


def dense_flops_fwd(model: ModelShape, tokens: int, seq_len: int, layers: int, moe_layers: int, head: bool) -> float:
    """Forward FLOPs outside the routed experts: attention (weights and scores), router, shared/dense FFNs, head."""
    d, mult = model.d_model, 3 if model.gated else 2
    per_layer = 2 * tokens * (model.attn_weights + 2 * d) + 2 * tokens * seq_len * d  # causal: half of 4 T S D
    f = layers * per_layer
    f += moe_layers * 2 * tokens * (model.num_experts * d + mult * d * model.shared_d_hidden)
    f += (layers - moe_layers) * 2 * tokens * mult * d * model.ffn_hidden
    return f + (2 * tokens * model.vocab_size * d if head else 0.0)


def memory(model: ModelShape, work: Workload, layout: Layout, g: Geometry, migrated: int) -> dict[str, float]:
    """Bytes per rank: weights, gradients, optimizer state, activations (the first pipeline stage's)."""
    # a domain holds copies of the migrated experts homed in the other domains, spread over its ranks
    slots = model.num_experts // layout.ep + layout.replicas + math.ceil(migrated * (g.domains - 1) / g.domains
                                                                         / g.per_domain)
    moe_stage = math.ceil(model.moe_layers / layout.pp)
    params = model.dense_params() / layout.pp + moe_stage * slots * model.expert_params
    in_flight = (layout.pp + 1 if layout.schedule == "dualpipe" else min(layout.pp, layout.microbatches))
    tokens = work.tokens_per_rank * layout.pp / layout.microbatches * in_flight
    layers = math.ceil(model.n_layers / layout.pp)
    mult = 3 if model.gated else 2
    if layout.recompute:
        per_token = layers * model.d_model
    else:
        per_token = layers * work.activation_factor * model.d_model \
            + moe_stage * model.top_k * (2 * model.d_model + mult * model.d_expert)
    if layout.schedule == "dualpipe":
        params *= 2  # DualPipe keeps two copies of the parameters (seed003 §2.2)
    # ZeRO shards dense state over the stage's data-parallel ranks and expert state over the EDP group
    dense = model.dense_params() / layout.pp * (2 if layout.schedule == "dualpipe" else 1)
    expert = params - dense
    edp = max(g.dp // layout.ep, 1)
    opt = dense / (g.dp if layout.zero >= 1 else 1) + expert / (edp if layout.zero >= 1 else 1)
    grads = dense / (g.dp if layout.zero >= 2 else 1) + expert / (edp if layout.zero >= 2 else 1)
    return {"weights": params * work.param_bytes, "grads": grads * work.grad_bytes,
            "optimizer": opt * work.optimizer_bytes, "activations": tokens * per_token * work.act_bytes}


def _stage_pass(model: ModelShape, cluster: Cluster, layout: Layout, g: Geometry, work: Workload,
                loads: list[np.ndarray], tokens: int) -> tuple[float, float, dict[str, float], LayerCost]:
    """(forward, backward, breakdown, first MoE layer) of one microbatch through one pipeline stage."""
    # an uneven split: the busiest stage (ceil of layers / pp) sets the pace
    moe = math.ceil(model.moe_layers / layout.pp)
    layers = math.ceil(model.n_layers / layout.pp)
    distinct = [layer_cost(model, cluster, layout, g, ld, tokens, work.act_bytes, work.grad_bytes) for ld in loads]
    weight = moe / len(distinct)  # per-layer loads repeat evenly over the stage's MoE layers
    rate = cluster.gemm_tflops * 1e12
    dense = dense_flops_fwd(model, tokens, work.seq_len, layers, moe, head=False) / rate
    if layout.pp == 1:
        dense += 2 * tokens * model.vocab_size * model.d_model / rate
    fwd = dense + weight * sum(lc.fwd for lc in distinct)
    bwd = 2 * dense + weight * sum(lc.bwd for lc in distinct)
    if layout.recompute:
        bwd += fwd
    again = 1.0 if layout.recompute else 0.0  # recomputation runs each forward, its all-to-alls included, twice
    bd = {"expert": weight * sum((3 + again) * lc.expert_fwd for lc in distinct),
          "dense": (3 + again) * dense,
          "a2a": weight * sum((1 + again) * lc.a2a_fwd + lc.a2a_bwd for lc in distinct),
          "small_a2a": weight * sum((1 + again) * lc.small for lc in distinct),
          "overhead": moe * cluster.layer_overhead_us * 1e-6}
    fwd += weight * sum(lc.small for lc in distinct) + bd["overhead"]
    if layout.recompute:
        bwd += weight * sum(lc.small for lc in distinct)
    plain = bd["expert"] + bd["dense"] + bd["a2a"] + bd["small_a2a"] + bd["overhead"]
    bd["overlap_saved"] = plain - (fwd + bwd)
    tiers: dict[str, float] = {}
    for lc in distinct:
        for t, v in lc.tiers.items():
            tiers[t] = tiers.get(t, 0.0) + weight * v
    bd["tiers"] = tiers  # type: ignore[assignment]
    bd["dropped"] = float(np.mean([lc.dropped for lc in distinct]))  # type: ignore[assignment]
    return fwd, bwd, bd, max(distinct, key=lambda lc: lc.rows_max)


def simulate(model: ModelShape, cluster: Cluster, work: Workload, layout: Layout, world: int,
             loads: list[np.ndarray] | None = None) -> Prediction:
    """Predicted step time, breakdown and memory of `layout` on `world` ranks of `cluster`."""
    g = geometry(cluster, layout, world)
    if model.num_experts % layout.ep:
        raise SimError(f"ep={layout.ep} does not divide num_experts={model.num_experts}: each rank must hold the "
                       "same number of experts")
    # tokens_per_rank is the global batch over all ranks: a pipeline replica of pp ranks runs pp times that
    replica_tokens = work.tokens_per_rank * layout.pp
    if replica_tokens % layout.microbatches:
        raise SimError(f"tokens per pipeline replica {replica_tokens} (tokens_per_rank x pp) is not divisible by "
                       f"microbatches={layout.microbatches}")
    if layout.pp > model.n_layers:
        raise SimError(f"pp={layout.pp} stages exceed the model's {model.n_layers} layers")
    loads = loads if loads is not None else layer_loads(work.traffic, model)
    mb = replica_tokens // layout.microbatches
    f, b, bd, hot = _stage_pass(model, cluster, layout, g, work, loads, mb)
    m, pp = layout.microbatches, layout.pp
    tiers = bd.pop("tiers")  # type: ignore[arg-type]
    dropped = bd.pop("dropped")
    scale = {k: v * m for k, v in bd.items()}
    p2p = 0.0
    if pp > 1:
        # activations forward and their gradients backward across each stage boundary, once per microbatch
        name = "node" if g.dp < cluster.ranks_per_node else "domain" if g.dp < cluster.ranks_per_domain else "wan"
        tier = cluster.tier(name)
        p2p = 2 * (tier.latency_us * 1e-6 + mb * model.d_model * work.act_bytes / cluster.rank_bandwidth(name))
    if layout.schedule == "dualpipe" and pp > 1:
        # (PP/2 - 1)(F&B + B - 3W): W, the weight-gradient half of B; F&B overlaps one's a2a with another's compute
        w = b / 2
        fb = max(f + b - (bd["a2a"] + bd["small_a2a"]), bd["a2a"] + bd["small_a2a"])
        bubble = (pp / 2 - 1) * max(fb + b - 3 * w, 0.0)
    else:
        bubble = (pp - 1) * (f + b)  # 1F1B: (PP - 1)(F + B)
    rate_bd = dict(scale)
    rate_bd["bubble"] = bubble
    rate_bd["p2p"] = (m + pp - 1) * p2p
    # gradients: dense weights over the stage's dp ranks, expert weights over the EDP group (ranks ep apart);
    # moeflow reduces after backward, so nothing hides them
    mw = math.ceil(model.moe_layers / pp)
    dense_bytes = (model.dense_params() / pp) * work.grad_bytes
    expert_bytes = mw * (model.num_experts // layout.ep + layout.replicas) * model.expert_params * work.grad_bytes
    sync = all_reduce_time(dense_bytes, group_sizes(g.dp, 1, cluster), cluster)
    if g.dp // layout.ep > 1:
        sync += all_reduce_time(expert_bytes, group_sizes(g.dp // layout.ep, layout.ep, cluster), cluster)
    rate_bd["grad_sync"] = sync
    rate_bd["migrate_sync"] = mw * hot.migrate_sync
    step = m * (f + b) + bubble + rate_bd["p2p"] + sync + rate_bd["migrate_sync"]
    mem = memory(model, work, layout, g, hot.migrated)
    fits = sum(mem.values()) <= cluster.memory_GiB * 2**30
    return Prediction(layout, step, rate_bd, {t: v * m for t, v in tiers.items()}, mem, hot.imbalance,
                      hot.migrated, fits, world, dropped, _phases(hot))
