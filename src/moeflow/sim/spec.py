"""The simulator's inputs: model shape, cluster, workload and layout, their JSON files, and named presets.

Stdlib and moeflow.config only (tests/test_layering.py): the CLI turns moeflow and HF configs into a ModelShape.
Units: bytes, seconds and FLOP/s internally; files use GB/s (1e9 bytes/s), microseconds and TFLOP/s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from moeflow.config import Config, ConfigError, check_choice, check_int, check_number, closest, need

MODES = ("variable", "padded", "dedup")
SCHEDULES = ("1f1b", "dualpipe")
TRAFFIC_KINDS = ("uniform", "zipf", "lognormal", "loads", "metrics")
TIER_NAMES = ("node", "domain", "wan")  # inside a node; between nodes of a domain; between domains
SHARED_BY = ("rank", "node", "domain")


class SimError(ConfigError):
    """A simulator input (file, preset or value) is invalid; the message names it and how to fix it."""


@dataclass(kw_only=True)
class ModelShape(Config):
    """What the cost model needs of a model: sizes, MoE layers, routing shape (not the weights)."""

    name: str = "model"
    d_model: int
    n_layers: int
    moe_layers: int  # how many of the n_layers have an MoE FFN (the rest have a dense FFN of ffn_hidden)
    num_experts: int
    top_k: int
    d_expert: int  # hidden size of one routed expert
    gated: bool = True  # SwiGLU-style experts: 3*D*H weights, else 2*D*H
    shared_d_hidden: int = 0  # total hidden size of the shared experts (0: none)
    ffn_hidden: int = 0  # dense FFN hidden size of the non-MoE layers
    attn_params: int = 0  # attention weights per layer (0: 4*D^2)
    n_heads: int = 0  # only for the record
    vocab_size: int = 32000
    route_groups: int = 1  # group-limited routing (DeepSeek n_group, moeflow num_clusters); 1 = flat top-k
    route_groups_per_token: int = 1  # groups each token may use (DeepSeek topk_group)
    capacity_factor: float | None = None  # None: dropless
    config_name = "model"

    def __post_init__(self) -> None:
        """Validate sizes and the routing shape."""
        check_int(self, "d_model", "n_layers", "num_experts", "top_k", "d_expert", "vocab_size", "route_groups",
                  "route_groups_per_token")
        check_int(self, "moe_layers", lo=1, hi=self.n_layers)
        check_int(self, "shared_d_hidden", "ffn_hidden", "attn_params", "n_heads", lo=0)
        need(self.top_k <= self.num_experts, f"model.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        need(self.num_experts % self.route_groups == 0,
             f"model.route_groups={self.route_groups} must divide num_experts={self.num_experts}")
        need(self.route_groups_per_token <= self.route_groups,
             f"model.route_groups_per_token={self.route_groups_per_token} exceeds route_groups={self.route_groups}")
        need(self.top_k <= self.route_groups_per_token * self.num_experts // self.route_groups,
             f"model.top_k={self.top_k} experts do not fit in {self.route_groups_per_token} group(s) of "
             f"{self.num_experts // self.route_groups} experts")
        check_number(self, "capacity_factor", lo=0, lo_open=True, none="dropless")
        if self.moe_layers < self.n_layers and self.ffn_hidden == 0:
            raise SimError(f"model has {self.n_layers - self.moe_layers} dense layers but ffn_hidden=0; set the "
                           "dense FFN's hidden size")

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert."""
        return (3 if self.gated else 2) * self.d_model * self.d_expert

    @property
    def attn_weights(self) -> int:
        """Attention weights per layer."""
        return self.attn_params or 4 * self.d_model * self.d_model

    def dense_params(self) -> int:
        """Every weight that is not a routed expert (replicated on each rank of a pipeline stage)."""
        d, mult = self.d_model, 3 if self.gated else 2
        per_moe = self.num_experts * d + mult * d * self.shared_d_hidden  # router + shared experts
        dense_ffn = mult * d * self.ffn_hidden
        layers = self.n_layers * (self.attn_weights + 2 * d) + self.moe_layers * per_moe
        return layers + (self.n_layers - self.moe_layers) * dense_ffn + 2 * self.vocab_size * d

    def num_params(self) -> int:
        """All weights."""
        return self.dense_params() + self.moe_layers * self.num_experts * self.expert_params


@dataclass(kw_only=True)
class Tier(Config):
    """One level of the network: per-direction bandwidth, latency, per-peer cost (α-β)."""

    bandwidth_GBps: float  # 1e9 bytes/s per direction
    latency_us: float  # paid once per collective step on this tier (propagation; peers are reached concurrently)
    per_peer_us: float = 0.0  # paid per peer of an all-to-all (message posting, serialised by the sender)
    shared_by: str = "rank"  # who shares this bandwidth: each rank has its own link, or one per node/domain
    config_name = "tier"

    def __post_init__(self) -> None:
        """Bandwidth > 0, latency >= 0."""
        check_number(self, "bandwidth_GBps", lo=0, lo_open=True)
        check_number(self, "latency_us", "per_peer_us", lo=0)
        check_choice(self, "shared_by", SHARED_BY)


@dataclass(kw_only=True)
class Cluster(Config):
    """Ranks -> nodes -> domains (datacenters), each level a Tier; compute and memory per rank."""

    name: str = "cluster"
    ranks_per_node: int
    nodes_per_domain: int = 1_000_000  # default: one domain however many nodes
    gemm_tflops: float  # achievable FLOP/s per rank for the model's GEMMs, in 1e12
    memory_GiB: float = 80.0
    launch_us: float = 0.0  # fixed cost of one collective call, on top of the tiers' per-peer latencies
    layer_overhead_us: float = 0.0  # host-side work of one MoE layer per step (fwd + bwd) besides GEMMs and a2a
    # ranks' worth of compute one node has when all its ranks are busy (0: one per rank, as with GPUs); CPU ranks
    # that oversubscribe cores share them, so a hot rank runs faster once the others wait (processor sharing)
    node_compute_ranks: float = 0.0
    node: Tier
    domain: Tier | None = None  # needed once a run spans two nodes
    wan: Tier | None = None  # needed once a run spans two domains
    config_name = "cluster"

    def __post_init__(self) -> None:
        """Positive sizes and rates."""
        check_int(self, "ranks_per_node", "nodes_per_domain")
        check_number(self, "gemm_tflops", "memory_GiB", lo=0, lo_open=True)
        check_number(self, "launch_us", "layer_overhead_us", "node_compute_ranks", lo=0)
        for name in TIER_NAMES:
            t = getattr(self, name)
            need(t is None or isinstance(t, Tier), f"cluster.{name} must be a tier mapping "
                                                   "{bandwidth_GBps, latency_us, shared_by}")

    @property
    def ranks_per_domain(self) -> int:
        """Ranks that share one domain."""
        return self.ranks_per_node * self.nodes_per_domain

    def tier(self, name: str) -> Tier:
        """The named tier, or an error saying the run needs it."""
        t = getattr(self, name)
        if t is None:
            what = {"domain": "more than one node", "wan": "more than one domain"}[name]
            raise SimError(f"cluster {self.name!r} has no '{name}' tier but the layout spans {what}; add "
                           f"\"{name}\": {{\"bandwidth_GBps\": ..., \"latency_us\": ...}} to the cluster file")
        return t

    def rank_bandwidth(self, name: str) -> float:
        """Bytes/s one rank gets on a tier when every rank uses it at once (a shared link is split)."""
        t = self.tier(name)
        share = {"rank": 1, "node": self.ranks_per_node, "domain": self.ranks_per_domain}[t.shared_by]
        return t.bandwidth_GBps * 1e9 / share


@dataclass(kw_only=True)
class Traffic(Config):
    """How tokens spread over experts in each MoE layer."""

    kind: str = "uniform"
    s: float = 1.0  # zipf exponent
    sigma: float = 1.0  # lognormal spread
    seed: int = 0  # lognormal draw and the permutation of skewed loads over experts
    tokens_per_expert: list[Any] = field(default_factory=list)  # kind=loads: one list per MoE layer (or one for all)
    path: str = ""  # kind=metrics: a moeflow run's metrics.jsonl (relative to the workload file)
    step: int = -1  # kind=metrics: which train record (-1: the last)
    config_name = "workload.traffic"

    def __post_init__(self) -> None:
        """Known kind and its parameters."""
        check_choice(self, "kind", TRAFFIC_KINDS)
        check_number(self, "s", "sigma", lo=0)
        need(self.kind != "loads" or bool(self.tokens_per_expert),
             "workload.traffic kind=loads needs tokens_per_expert: a list of per-expert counts per MoE layer")
        need(self.kind != "metrics" or bool(self.path),
             "workload.traffic kind=metrics needs path: a moeflow run's metrics.jsonl")


@dataclass(kw_only=True)
class Workload(Config):
    """Tokens per rank per step, the traffic, and the bytes per value of each kind of state."""

    name: str = "workload"
    tokens_per_rank: int  # global tokens per optimizer step / ranks (a pipeline replica of pp ranks runs pp x this)
    seq_len: int = 2048
    traffic: Traffic = field(default_factory=Traffic)
    act_bytes: int = 2  # activations on the wire and in memory (bf16)
    param_bytes: int = 2
    grad_bytes: int = 2
    optimizer_bytes: int = 12  # per parameter: Adam m, v and an fp32 master copy
    activation_factor: float = 34.0  # activation bytes per token per layer per act byte / D (Megatron's 34sbh/2)
    config_name = "workload"

    def __post_init__(self) -> None:
        """Positive sizes."""
        check_int(self, "tokens_per_rank", "seq_len", "act_bytes", "param_bytes", "grad_bytes")
        check_int(self, "optimizer_bytes", lo=0)
        check_number(self, "activation_factor", lo=0)
        need(isinstance(self.traffic, Traffic), "workload.traffic must be a mapping {kind: ...}")


@dataclass(kw_only=True)
class Layout(Config):
    """One candidate way to run: parallel sizes and the EP options moeflow has (or that are being modelled)."""

    ep: int
    pp: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    mode: str = "variable"
    hierarchical: bool = False  # route each token to one cluster of experts that lives on one rank (G = ep)
    replicas: int = 0  # extra expert slots per rank, filled by EPLB's greedy replication + balanced packing
    overlap: int = 1  # Tutel-style overlap degree: chunks pipelining dispatch, experts and combine
    migrate: bool = False  # HybridEP-style: copy an expert into a domain when that beats moving its tokens
    migrate_every: int = 1  # steps between weight/gradient exchanges of a migrated copy (divides its cost)
    tier_overlap: bool = False  # two-tier a2a whose tiers run concurrently (DeepEP): max of tiers, not the sum
    recompute: bool = False  # activation recomputation: keep layer inputs only, pay one more forward
    zero: int = 0  # ZeRO stage: 1 shards optimizer state over the data-parallel ranks, 2 gradients too
    config_name = "layout"

    def __post_init__(self) -> None:
        """Known options, positive sizes."""
        check_int(self, "ep", "pp", "microbatches", "overlap", "migrate_every")
        check_int(self, "replicas", lo=0)
        check_int(self, "zero", lo=0, hi=2)
        check_choice(self, "mode", MODES)
        check_choice(self, "schedule", SCHEDULES)
        need(self.schedule != "dualpipe" or self.pp % 2 == 0,
             f"layout.schedule=dualpipe needs an even pp, got pp={self.pp}")

    def label(self) -> str:
        """A short name for tables."""
        parts = [f"ep{self.ep}", self.mode]
        if self.pp > 1:
            parts.append(f"pp{self.pp}x{self.microbatches}{'dp' if self.schedule == 'dualpipe' else ''}")
        if self.hierarchical:
            parts.append("hier")
        if self.replicas:
            parts.append(f"+{self.replicas}rep")
        if self.overlap > 1:
            parts.append(f"ov{self.overlap}")
        if self.migrate:
            parts.append("migrate" + (f"/{self.migrate_every}" if self.migrate_every > 1 else ""))
        if self.tier_overlap:
            parts.append("tierov")
        if self.recompute:
            parts.append("recomp")
        if self.zero:
            parts.append(f"zero{self.zero}")
        return " ".join(parts)


# ------------------------------------------------------------------------------------------- presets
def _switch_c_2048() -> ModelShape:
    # Switch-C (Fedus et al. 2022, Table 9): d_model 2048, d_ff 6144, 32 heads, 15 layers per stack (T5 counts
    # encoder and decoder separately: 30 in all), every FFN an MoE of 2048 experts, top-1, capacity factor 1.0;
    # 1.55T expert weights of the paper's 1571B. Decoder layers also cross-attend: 6 D^2 attention weights on average
    d = 2048
    return ModelShape(name="switch-c-2048", d_model=d, n_layers=30, moe_layers=30, num_experts=2048, top_k=1,
                      d_expert=6144, gated=False, attn_params=6 * d * d, n_heads=32, vocab_size=32128,
                      capacity_factor=1.0)


def _gshard_600b() -> ModelShape:
    # GShard 600B (Lepikhin et al. 2020, Table 1): 36 layers (MoE in every other FFN), 2048 experts, top-2,
    # d_model 1024, d_ff 8192, capacity factor 2 (per-group capacity 2N/(G*E)), 16 heads
    return ModelShape(name="gshard-600b", d_model=1024, n_layers=36, moe_layers=18, num_experts=2048, top_k=2,
                      d_expert=8192, gated=False, ffn_hidden=8192, n_heads=16, vocab_size=32000,
                      capacity_factor=2.0)


def _deepseek_v3() -> ModelShape:
    # DeepSeek-V3 config.json: 61 layers (first 3 dense, ffn 18432), 256 routed experts of 2048 + 1 shared, top-8
    # within 4 of 8 groups; MLA attention ~ 187M weights per layer (q_lora 1536, kv_lora 512, 128 heads)
    d = 7168
    attn = d * 1536 + 1536 * 128 * 192 + d * (512 + 64) + 512 * 128 * 256 + 128 * 128 * d
    return ModelShape(name="deepseek-v3", d_model=d, n_layers=61, moe_layers=58, num_experts=256, top_k=8,
                      d_expert=2048, gated=True, shared_d_hidden=2048, ffn_hidden=18432, attn_params=attn,
                      n_heads=128, vocab_size=129280, route_groups=8, route_groups_per_token=4)


def _mixtral_8x7b() -> ModelShape:
    d = 4096
    return ModelShape(name="mixtral-8x7b", d_model=d, n_layers=32, moe_layers=32, num_experts=8, top_k=2,
                      d_expert=14336, gated=True, attn_params=2 * d * d + 2 * d * 1024, n_heads=32)


MODEL_SHAPES: dict[str, Callable[[], ModelShape]] = {
    "switch-c-2048": _switch_c_2048,
    "gshard-600b": _gshard_600b,
    "deepseek-v3": _deepseek_v3,
    "mixtral-8x7b-shape": _mixtral_8x7b,
}


def _gpu_node(name: str, nvlink: float, ib: float, tflops: float, mem: float, wan_gbit: float = 100.0,
              nodes_per_domain: int = 1_000_000, ib_shared: str = "rank") -> Cluster:
    """An 8-GPU node type as a Cluster (NVLink-class node tier, NIC tier, one WAN link per domain)."""
    # DeepEP's low-latency dispatch grows from 77 us (EP 8) to 194 us (EP 256), ~0.75 us per extra peer: 1 us
    # per peer, a 15 us launch; NCCL rule of thumb (ep-reliability-papers §1.8): ~5 us inside a node, ~10 us
    # across IB; a WAN hop 1 ms one way. The WAN link is one per domain, shared by all its ranks.
    return Cluster(name=name, ranks_per_node=8, nodes_per_domain=nodes_per_domain, gemm_tflops=tflops,
                   memory_GiB=mem, launch_us=15.0, node=Tier(bandwidth_GBps=nvlink, latency_us=5.0, per_peer_us=1.0),
                   domain=Tier(bandwidth_GBps=ib, latency_us=10.0, per_peer_us=1.0, shared_by=ib_shared),
                   wan=Tier(bandwidth_GBps=wan_gbit / 8, latency_us=1000.0, per_peer_us=1.0, shared_by="domain"))


CLUSTER_PRESETS: dict[str, Callable[[], Cluster]] = {
    # per GPU: NVLink4 450 GB/s per direction, one 400 Gb/s NDR NIC (50 GB/s); ~60% of 989 dense bf16 TFLOP/s
    "dgx-h100": lambda: _gpu_node("dgx-h100", 450.0, 50.0, 600.0, 80.0),
    # H800: NVLink cut to ~160 GB/s (DeepSeek-V3 §3.2.2), same NIC
    "hgx-h800": lambda: _gpu_node("hgx-h800", 160.0, 50.0, 600.0, 80.0),
    # H200: the H100's links and compute with 141 GB of HBM3e
    "hgx-h200": lambda: _gpu_node("hgx-h200", 450.0, 50.0, 600.0, 141.0),
    # NVLink3 300 GB/s, 200 Gb/s HDR NIC per GPU; ~65% of 312 bf16 TFLOP/s
    "dgx-a100": lambda: _gpu_node("dgx-a100", 300.0, 25.0, 200.0, 80.0),
    # 8 PCIe GPUs (PCIe4 x16 ~ 25 GB/s achievable), one 100 Gb/s Ethernet NIC per node
    "pcie-l40s": lambda: _gpu_node("pcie-l40s", 25.0, 12.5, 180.0, 48.0, ib_shared="node"),
}
WORKLOAD_PRESETS = ("uniform", "zipf", "lognormal")


def multi_dc(base: Cluster, nodes_per_domain: int, wan_gbit: float, wan_latency_us: float = 1000.0) -> Cluster:
    """`base` split into domains of `nodes_per_domain` nodes joined by one `wan_gbit` Gb/s link per domain."""
    return base.replace(name=f"{base.name}/{nodes_per_domain}n-dc@{wan_gbit:g}Gb", nodes_per_domain=nodes_per_domain,
                        wan=Tier(bandwidth_GBps=wan_gbit / 8, latency_us=wan_latency_us, per_peer_us=1.0,
                                 shared_by="domain"))


# ------------------------------------------------------------------------------------------- files
def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from a file, or a SimError naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise SimError(f"{what} file {str(p)!r} does not exist")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SimError(f"{what} file {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise SimError(f"{what} file {str(p)!r} must hold a JSON object, got {type(d).__name__}")
    return d


def example_path(name: str) -> Path:
    """Path of a file shipped in moeflow/sim/examples (the documented examples)."""
    return Path(str(resources.files("moeflow.sim") / "examples" / name))


def _preset(name: str, table: dict[str, Any], what: str) -> Any:
    """The named preset from `table`, or a SimError listing the presets (and the closest name)."""
    if name not in table:
        close = closest(name, table)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SimError(f"unknown {what} preset {name!r}{hint}; presets: {', '.join(table)}, or give a JSON file")
    return table[name]()


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    """Drop keys starting with '_' (comments in the example files)."""
    return {k: (_strip(v) if isinstance(v, dict) else v) for k, v in d.items() if not str(k).startswith("_")}


def load_cluster(spec: str) -> Cluster:
    """A cluster preset name or a cluster JSON file."""
    if not spec.endswith(".json") and not Path(spec).exists():
        return _preset(spec, CLUSTER_PRESETS, "cluster")
    return Cluster.from_dict(_strip(read_json(spec, "cluster")), "cluster")


def load_workload(spec: str, tokens_per_rank: int | None = None) -> Workload:
    """A workload JSON file, or a traffic preset name (uniform, zipf, lognormal) with `tokens_per_rank`."""
    if not spec.endswith(".json") and not Path(spec).exists():
        if spec not in WORKLOAD_PRESETS:
            close = closest(spec, WORKLOAD_PRESETS)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SimError(f"unknown workload {spec!r}{hint}; give {', '.join(WORKLOAD_PRESETS)} or a JSON file")
        return Workload(name=spec, tokens_per_rank=tokens_per_rank or 4096, traffic=Traffic(kind=spec))
    d = _strip(read_json(spec, "workload"))
    if tokens_per_rank is not None:
        d["tokens_per_rank"] = tokens_per_rank
    w = Workload.from_dict(d, "workload")
    if w.traffic.kind == "metrics" and not Path(w.traffic.path).is_absolute():
        w.traffic.path = str(Path(spec).resolve().parent / w.traffic.path)
    return w


def model_shape_from_dict(d: dict[str, Any], where: str = "model") -> ModelShape:
    """A ModelShape from its JSON mapping (the simulator's own model format)."""
    return ModelShape.from_dict(_strip(d), where)


def is_shape_dict(d: dict[str, Any]) -> bool:
    """Whether a model file is in the simulator's own format (it has the fields only ModelShape has)."""
    return "d_expert" in d and "moe_layers" in d
