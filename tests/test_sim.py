"""The EP cost model (moeflow.sim): golden numbers worked by hand, properties, file-format errors, planner."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from moeflow.sim import CLUSTER_PRESETS, MODEL_SHAPES, Cluster, Layout, ModelShape, Search, SimError, Tier, Workload
from moeflow.sim import load_cluster, load_workload, plan, simulate
from moeflow.sim.cost import (a2a_time, all_reduce_time, geometry, group_sizes, layer_cost, moe_layer_step,
                              rows_matrix, tier_volumes)
from moeflow.sim.spec import Traffic, example_path, multi_dc
from moeflow.sim.traffic import (balanced_packing, contiguous, eplb, exact_rows, hit_prob, layer_loads,
                                 padded_slots, replicate_experts)


def one_node(ranks: int, bw: float = 1.0, lat: float = 10.0, per_peer: float = 2.0, launch: float = 5.0,
             tflops: float = 1e-3) -> Cluster:
    """A single-node cluster with easy numbers: bw GB/s, microsecond latencies, GFLOP/s-scale compute."""
    return Cluster(name="t", ranks_per_node=ranks, gemm_tflops=tflops, launch_us=launch,
                   node=Tier(bandwidth_GBps=bw, latency_us=lat, per_peer_us=per_peer))


def shape(e: int = 4, k: int = 2, d: int = 16, h: int = 32, **kw) -> ModelShape:
    """A one-layer MoE shape."""
    return ModelShape(d_model=d, n_layers=1, moe_layers=1, num_experts=e, top_k=k, d_expert=h, **kw)


# ------------------------------------------------------------------------------------------- golden numbers
def test_a2a_two_ranks_by_hand() -> None:
    """2 ranks, uniform over 4 experts, T=100, k=2: 100 rows of 16 fp32 = 6400 B to the peer at 1 GB/s = 6.4 us,
    plus launch 5 + latency 10 + 1 peer x 2 = 23.4 us."""
    c, lay = one_node(2), Layout(ep=2)
    g = geometry(c, lay, 2)
    rows = np.full((1, 2), 100.0)  # 100 x k=2 x share 0.5
    t = a2a_time(rows, g, c, 16 * 4, tier_overlap=False)
    assert t.time == pytest.approx(23.4e-6)
    assert t.alpha == pytest.approx(17e-6)
    assert t.max_rows_out == 100


def test_a2a_two_tiers_by_hand() -> None:
    """4 ranks on 2 nodes of 2, uniform: each rank sends 50 rows to its node peer and 50 to each of 2 remote
    ranks. node: 10 + 2 + 50*64/1e9 s; domain (10 GB/s, 20 us, 1 us/peer): 20 + 2 + 100*64/1e10 s."""
    c = Cluster(name="t", ranks_per_node=2, gemm_tflops=1.0, node=Tier(bandwidth_GBps=1.0, latency_us=10,
                per_peer_us=2), domain=Tier(bandwidth_GBps=10.0, latency_us=20, per_peer_us=1))
    g = geometry(c, Layout(ep=4), 4)
    rows = np.full((1, 4), 50.0)
    node = 12e-6 + 50 * 64 / 1e9
    dom = 22e-6 + 100 * 64 / 1e10
    assert a2a_time(rows, g, c, 64, False).time == pytest.approx(node + dom)
    assert a2a_time(rows, g, c, 64, True).time == pytest.approx(max(node, dom))  # overlapped tiers
    assert a2a_time(rows, g, c, 64, False).tiers == pytest.approx({"node": node, "domain": dom})


def test_dedup_hits_uniform_are_exact() -> None:
    """E=8 on 4 ranks, top-2: a token reaches 4 * (1 - C(6,2)/C(8,2)) = 13/7 ranks; k=1: exactly one."""
    h = hit_prob(np.full(4, 0.25), shape(e=8, k=2), 4, hierarchical=False)
    assert h.sum() == pytest.approx(4 * (1 - math.comb(6, 2) / math.comb(8, 2)))
    assert hit_prob(np.full(4, 0.25), shape(e=8, k=1), 4, False).sum() == pytest.approx(1.0)
    # one cluster per rank: every token goes to exactly one rank, whatever k
    assert hit_prob(np.array([0.4, 0.3, 0.2, 0.1]), shape(e=8, k=2), 4, True).sum() == pytest.approx(1.0)


def test_grouped_routing_hits_by_hand() -> None:
    """DeepSeek-style: 8 groups of 4 experts on 8 ranks (a rank = a group), 4 groups per token: P(rank hit) =
    1 - C(7,4)/C(8,4) = 1/2, so 4 ranks per token."""
    m = shape(e=32, k=8, route_groups=8, route_groups_per_token=4)
    assert hit_prob(np.full(8, 1 / 8), m, 8, False).sum() == pytest.approx(8 * (1 - math.comb(7, 4) / math.comb(8, 4)))


def test_all_reduce_by_hand() -> None:
    """1 GB over 8 ranks of one node at 100 GB/s: 2 * 7/8 * 1e9 / 1e11 = 17.5 ms, plus 14 latencies of 1 us."""
    c = Cluster(name="t", ranks_per_node=8, gemm_tflops=1.0, node=Tier(bandwidth_GBps=100, latency_us=1))
    assert all_reduce_time(1e9, group_sizes(8, 1, c), c) == pytest.approx(17.5e-3 + 14e-6)


def test_group_sizes() -> None:
    """Dense groups are contiguous; EDP groups are strided by ep (moeflow's ParallelDims)."""
    c = CLUSTER_PRESETS["dgx-h100"]()
    c = c.replace(nodes_per_domain=4)  # 32 ranks per domain
    assert group_sizes(64, 1, c) == {"node": 8, "domain": 4, "wan": 2}
    assert group_sizes(16, 4, c) == {"node": 2, "domain": 4, "wan": 2}  # ranks 0,4,8,...,60
    assert group_sizes(2, 32, c) == {"node": 1, "domain": 1, "wan": 2}


def test_expert_compute_by_hand() -> None:
    """Rows received x 2 x 3 D H flops forward; the hottest rank gates. E=4 on 2 ranks, loads 0.4/0.2/0.3/0.1:
    rank 0 gets 0.6 of 2 ranks x 100 tokens x 2 = 240 rows."""
    m = shape()
    c, lay = one_node(2), Layout(ep=2)
    lc = layer_cost(m, c, lay, geometry(c, lay, 2), np.array([0.4, 0.2, 0.3, 0.1]), 100, 4, 4)
    assert lc.rows_max == pytest.approx(240)
    assert lc.expert_fwd == pytest.approx(240 * 2 * 3 * 16 * 32 / 1e9)
    assert lc.imbalance == pytest.approx(1.2)


def test_padded_rows_follow_capacity() -> None:
    """Padded: every rank sends E/P experts x capacity slots to each peer, capacity = ceil(cf k T / E)."""
    m = shape(e=8, k=2, capacity_factor=1.25)
    assert padded_slots(m, 100) == math.ceil(1.25 * 2 * 100 / 8)
    c, lay = one_node(4), Layout(ep=4, mode="padded")
    lc = layer_cost(m, c, lay, geometry(c, lay, 4), np.full(8, 1 / 8), 100, 4, 4)
    assert lc.dispatch.max_rows_out == 3 * 2 * padded_slots(m, 100)


def test_eplb_building_blocks() -> None:
    """Greedy replication gives slots to the largest load per replica; packing fills equal-count packs."""
    assert replicate_experts(np.array([10.0, 1, 1, 1]), 6).tolist() == [3, 1, 1, 1]
    w = np.array([5.0, 4, 3, 2, 1, 1])
    pack = balanced_packing(w, 2)
    assert np.bincount(pack).tolist() == [3, 3]
    assert [w[pack == p].sum() for p in range(2)] == [8.0, 8.0]
    place = eplb(np.array([0.7, 0.1, 0.1, 0.1]), 2, 1)  # 6 slots: the hot expert gets 3 copies
    assert place.count_E.tolist() == [3, 1, 1, 1]
    # 3 slots of 0.7/3 and 3 of 0.1 in two packs of 3: the best split is 2 hot + 1 cold vs 1 hot + 2 cold
    assert place.rank_share(np.array([0.7, 0.1, 0.1, 0.1])).tolist() == pytest.approx([1.4 / 3 + 0.1, 0.7 / 3 + 0.2])


def test_hybrid_break_even_is_the_notes() -> None:
    """Two domains, bf16 both ways: an expert moves exactly when a remote domain sends it n > P_e/(2D) tokens
    per step (seed003 §4: 1.5 H for SwiGLU)."""
    d, h = 64, 128
    m = ModelShape(d_model=d, n_layers=1, moe_layers=1, num_experts=2, top_k=1, d_expert=h)
    c = Cluster(name="t", ranks_per_node=1, nodes_per_domain=1, gemm_tflops=1.0,
                node=Tier(bandwidth_GBps=10, latency_us=1), domain=Tier(bandwidth_GBps=10, latency_us=1),
                wan=Tier(bandwidth_GBps=0.1, latency_us=100, shared_by="domain"))
    lay = Layout(ep=2, migrate=True)
    g = geometry(c, lay, 2)
    be = 1.5 * h  # P_e / (2 D) = 3 D H / (2 D)
    # per-domain tokens to expert e: T x 1 rank x k=1 x load 0.5 -> T = 2 n
    below = layer_cost(m, c, lay, g, np.array([0.5, 0.5]), int(2 * be) - 2, 2, 2)
    above = layer_cost(m, c, lay, g, np.array([0.5, 0.5]), int(2 * be) + 2, 2, 2)
    assert below.migrated == 0 and above.migrated == 2


# ------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("rpn,npd,ep", [(2, 2, 8), (4, 1, 8), (8, 4, 8), (2, 1, 2), (4, 2, 16)])
def test_tier_sums_equal_the_full_matrix(rpn: int, npd: int, ep: int) -> None:
    """The O(J P) per-tier sums equal the P x P matrix summed by tier, for per-domain traffic patterns."""
    c = Cluster(name="t", ranks_per_node=rpn, nodes_per_domain=npd, gemm_tflops=1.0,
                node=Tier(bandwidth_GBps=1, latency_us=1), domain=Tier(bandwidth_GBps=1, latency_us=1),
                wan=Tier(bandwidth_GBps=1, latency_us=1))
    g = geometry(c, Layout(ep=ep), ep)
    rows = np.random.default_rng(ep + rpn).random((g.domains, ep)) * 100
    sent, recv = tier_volumes(rows, g)
    mat = rows_matrix(rows, g)
    node, dom = np.arange(ep) // rpn, np.arange(ep) // (rpn * npd)
    same_node = node[:, None] == node[None, :]
    same_dom = dom[:, None] == dom[None, :]
    off = ~np.eye(ep, dtype=bool)
    for name, mask in (("node", same_node & off), ("domain", same_dom & ~same_node), ("wan", ~same_dom)):
        assert sent[name] == pytest.approx((mat * mask).sum(1))
        assert recv[name] == pytest.approx((mat * mask).sum(0))
        assert sent[name].sum() == pytest.approx(recv[name].sum())


def test_step_is_monotone_in_bandwidth_rate_and_tokens() -> None:
    """Faster links or GEMMs never slow a layout down; more tokens never speed it up."""
    m = MODEL_SHAPES["deepseek-v3"]()
    base = CLUSTER_PRESETS["dgx-h100"]()
    w = Workload(tokens_per_rank=4096, traffic=Traffic(kind="zipf"))
    lay = Layout(ep=64, zero=1)
    steps = [simulate(m, base.replace(domain=base.domain.replace(bandwidth_GBps=bw)), w, lay, 256).step
             for bw in (5, 25, 50, 200)]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]
    rates = [simulate(m, base.replace(gemm_tflops=r), w, lay, 256).step for r in (100, 300, 900)]
    assert rates == sorted(rates, reverse=True)
    toks = [simulate(m, base, w.replace(tokens_per_rank=t), lay, 256).step for t in (1024, 2048, 8192)]
    assert toks == sorted(toks)


def test_replicas_and_dedup_help_where_they_should() -> None:
    """Skewed loads: EPLB replicas lower the hottest rank's rows; top-8 routing: dedup sends fewer rows."""
    m = MODEL_SHAPES["deepseek-v3"]()
    c = CLUSTER_PRESETS["dgx-h100"]()
    w = Workload(tokens_per_rank=4096, traffic=Traffic(kind="zipf", s=1.2))
    plain = simulate(m, c, w, Layout(ep=64, zero=1), 256)
    rep = simulate(m, c, w, Layout(ep=64, replicas=2, zero=1), 256)
    assert rep.imbalance < plain.imbalance
    lay_v, lay_d = Layout(ep=64), Layout(ep=64, mode="dedup")
    ld = layer_loads(w.traffic, m)[0]
    g = geometry(c, lay_v, 256)
    rv = layer_cost(m, c, lay_v, g, ld, 4096, 2, 2).dispatch.max_rows_out
    rd = layer_cost(m, c, lay_d, g, ld, 4096, 2, 2).dispatch.max_rows_out
    assert rd < rv


def test_hybrid_gain_grows_as_bandwidth_falls() -> None:
    """HybridEP's qualitative claim: where migration pays, its gain over plain EP grows as the WAN slows."""
    m = MODEL_SHAPES["deepseek-v3"]()
    base = CLUSTER_PRESETS["dgx-h100"]()
    w = Workload(tokens_per_rank=8192)
    gains = []
    for gbit in (400, 100, 10):
        c = multi_dc(base, 8, gbit)  # 64 ranks per domain, 4 domains
        plain = simulate(m, c, w, Layout(ep=256, zero=1), 256).step
        hyb = simulate(m, c, w, Layout(ep=256, zero=1, migrate=True), 256).step
        gains.append(plain / hyb)
    assert gains == sorted(gains) and gains[-1] > 1.0


def test_exact_rows_count_the_dispatchers_rules() -> None:
    """Rank 0 sends tokens 0,1 to experts {0,3} and {2,3} on 2 ranks of 2 experts: variable 1 local + 3 remote
    rows; dedup: token 0 -> both ranks, token 1 -> rank 1 only: 1 local, 2 remote, 12 B per remote row."""
    e = [np.array([0, 3, 2, 3]), np.array([1])]
    t = [np.array([0, 0, 1, 1]), np.array([0])]
    v = exact_rows(e, t, 4, "variable")
    assert v.rows_PP.tolist() == [[1, 3], [1, 0]]
    dd = exact_rows(e, t, 4, "dedup")
    assert dd.rows_PP.tolist() == [[1, 2], [1, 0]]
    assert dd.remote_bytes(8).tolist() == [2 * 8 + 3 * 12, 8 + 12]
    assert exact_rows(e, t, 4, "padded", slots=5).rows_PP.tolist() == [[10, 10], [10, 10]]
    assert contiguous(4, 2).rank_share(np.array([0.1, 0.2, 0.3, 0.4])).tolist() == pytest.approx([0.3, 0.7])


def test_moe_layer_step_adds_up() -> None:
    """The benchmark-shaped prediction is the sum of its parts."""
    c = one_node(2).replace(layer_overhead_us=100.0)
    p = moe_layer_step(shape(), c, Layout(ep=2), np.full(4, 0.25), 100)
    assert p["step"] > p["token_a2a"] + p["expert"] + p["router"] + p["grad_sync"]


def test_4096_ranks_simulate_in_seconds() -> None:
    """The planner is O(layouts x (J P + E log E)), not O(P^2 T): a full Switch-C search on 4,096 ranks."""
    t0 = time.perf_counter()
    res = plan(MODEL_SHAPES["switch-c-2048"](), CLUSTER_PRESETS["dgx-h100"](), Workload(tokens_per_rank=4096),
               4096, Search(replicas=[0, 1], overlap=[1, 2], hierarchical=[False, True]))
    assert time.perf_counter() - t0 < 20
    assert res.ranked and res.ranked[0].step == min(p.step for p in res.ranked)


# ------------------------------------------------------------------------------------------- inputs and errors
def test_shipped_examples_load() -> None:
    """Every documented example file parses."""
    c = load_cluster(str(example_path("cluster-2dc-h100.json")))
    assert c.ranks_per_domain == 512 and c.wan is not None and c.wan.shared_by == "domain"
    w = load_workload(str(example_path("workload-zipf.json")))
    assert w.traffic.kind == "zipf" and w.tokens_per_rank == 4096
    wm = load_workload(str(example_path("workload-metrics.json")))
    loads = layer_loads(wm.traffic, ModelShape(d_model=128, n_layers=4, moe_layers=4, num_experts=8, top_k=2,
                                               d_expert=256))
    assert len(loads) == 4 and all(ld.sum() == pytest.approx(1.0) for ld in loads)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["node"].update(bandwidth_GBps=0), "tier.bandwidth_GBps must be a finite number > 0"),
    (lambda d: d["wan"].update(latency_us=-1), "tier.latency_us"),
    (lambda d: d.update(ranks_per_nod=8), "did you mean ranks_per_node"),
    (lambda d: d["domain"].update(shared_by="rack"), "shared_by='rack' is unknown"),
    (lambda d: d.update(gemm_tflops=0), "cluster.gemm_tflops"),
])
def test_bad_cluster_files_name_the_field(tmp_path: Path, edit, needle: str) -> None:  # noqa: ANN001
    """A bad value or key in a cluster file is a SimError/ConfigError naming it."""
    d = json.loads(example_path("cluster-2dc-h100.json").read_text())
    edit(d)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_cluster(str(p))


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    """Unknown presets, broken JSON, missing tiers, divisibility, loads of the wrong length, too-small clusters."""
    with pytest.raises(SimError, match="did you mean dgx-h100"):
        load_cluster("dgx-h10")
    bad = tmp_path / "x.json"
    bad.write_text("{nope")
    with pytest.raises(SimError, match="not valid JSON"):
        load_cluster(str(bad))
    with pytest.raises(SimError, match="does not exist"):
        load_workload(str(tmp_path / "missing.json"))
    m = shape(e=8)
    with pytest.raises(SimError, match="no 'domain' tier"):
        simulate(m, one_node(2), Workload(tokens_per_rank=64), Layout(ep=4), 4)
    c = CLUSTER_PRESETS["dgx-h100"]()
    with pytest.raises(SimError, match="do not nest"):
        simulate(shape(e=12), c, Workload(tokens_per_rank=64), Layout(ep=12), 24)
    with pytest.raises(SimError, match="must divide the data-parallel size"):
        simulate(m, c, Workload(tokens_per_rank=64), Layout(ep=8), 4)
    w = Workload(tokens_per_rank=64, traffic=Traffic(kind="loads", tokens_per_expert=[1, 2, 3]))
    with pytest.raises(SimError, match="must be 8 non-negative counts"):
        simulate(m, one_node(8), w, Layout(ep=8), 8)
    with pytest.raises(SimError, match="cluster is too small"):
        plan(MODEL_SHAPES["switch-c-2048"](), c, Workload(tokens_per_rank=4096), 16)
    with pytest.raises(ValueError, match="top_k=3 experts do not fit"):
        shape(e=8, k=3, route_groups=4, route_groups_per_token=1)


def test_capacity_drops_cap_the_hot_expert() -> None:
    """With a capacity factor an expert keeps at most cf/E of the assignments: loads 0.7/0.1/0.1/0.1 at cf 1.0
    keep 0.25 + 3 x 0.1 = 0.55, so 45% are dropped and the hot rank's rows shrink accordingly."""
    c, lay = one_node(2), Layout(ep=2)
    g = geometry(c, lay, 2)
    load = np.array([0.7, 0.1, 0.1, 0.1])
    free = layer_cost(shape(), c, lay, g, load, 100, 4, 4)
    capped = layer_cost(shape(capacity_factor=1.0), c, lay, g, load, 100, 4, 4)
    assert capped.dropped == pytest.approx(0.45)
    assert free.rows_max == pytest.approx(2 * 100 * 2 * 0.8)
    assert capped.rows_max == pytest.approx(2 * 100 * 2 * 0.35)


@pytest.mark.parametrize("lay", [Layout(ep=64), Layout(ep=64, mode="dedup", recompute=True),
                                 Layout(ep=32, pp=2, microbatches=4), Layout(ep=32, pp=2, microbatches=4,
                                                                             schedule="dualpipe", replicas=1)])
def test_breakdown_adds_up_to_the_step(lay: Layout) -> None:
    """Without an overlap degree nothing is hidden: the terms sum to the step time."""
    m = MODEL_SHAPES["deepseek-v3"]()
    p = simulate(m, CLUSTER_PRESETS["hgx-h200"](), Workload(tokens_per_rank=4096), lay, 256)
    assert p.breakdown["overlap_saved"] == pytest.approx(0.0, abs=1e-9 * p.step)
    total = sum(v for k, v in p.breakdown.items() if k != "overlap_saved")
    assert total == pytest.approx(p.step)


def test_small_groups_report_the_byte_matrix() -> None:
    """EP groups up to 64 ranks carry the P x P dispatch bytes and the tier of every pair (rows sum to sent)."""
    c = Cluster(name="t", ranks_per_node=2, gemm_tflops=1.0, node=Tier(bandwidth_GBps=1, latency_us=1),
                domain=Tier(bandwidth_GBps=1, latency_us=1))
    p = simulate(shape(e=4), c, Workload(tokens_per_rank=100, seq_len=16), Layout(ep=4), 4)
    mat = np.array(p.hot_layer["matrix"]["dispatch_bytes"])
    assert mat.shape == (4, 4) and mat[0, 1] == pytest.approx(100 * 2 * 0.25 * 16 * 2)  # bf16 rows
    assert p.hot_layer["matrix"]["tiers"][0] == ["self", "node", "domain", "domain"]


def test_eplb_hierarchical_matches_deepseeks_readme() -> None:
    """DeepSeek EPLB's README example (seed003 §1.1): 2 layers, 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs
    give exactly its phy2log, and per-GPU balancedness (mean/max) 0.828 and 0.805."""
    from moeflow.sim.traffic import eplb_hierarchical

    w = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, logcnt = eplb_hierarchical(w, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert (logcnt.sum(1) == 16).all()
    gpu = (np.take_along_axis(w / logcnt, phy2log, axis=1)).reshape(2, 8, 2).sum(-1)
    assert (gpu.mean(1) / gpu.max(1)).round(3).tolist() == [0.828, 0.805]
    with pytest.raises(SimError, match="hierarchical policy needs"):
        eplb_hierarchical(w, 16, 5, 2, 8)
