"""The planner: enumerate layouts, simulate each, keep those that fit in memory, rank by step time, explain.

A layout option moeflow does not implement yet (replicas, overlap > 1, migration, tier overlap, pipeline stages)
is still simulated, and flagged `modelled` so that nobody mistakes it for something `moeflow train` can run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from moeflow.sim.cost import Prediction, geometry, simulate
from moeflow.sim.spec import MODES, Cluster, Layout, ModelShape, SimError, Workload
from moeflow.sim.traffic import layer_loads


@dataclass(kw_only=True)
class Search:
    """Which layout options to try (each a list of values); ep=None tries every valid divisor."""

    ep: list[int] | None = None
    pp: list[int] = field(default_factory=lambda: [1])
    microbatches: list[int] = field(default_factory=lambda: [1])
    schedule: list[str] = field(default_factory=lambda: ["1f1b"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    hierarchical: list[bool] = field(default_factory=lambda: [False])
    replicas: list[int] = field(default_factory=lambda: [0])
    overlap: list[int] = field(default_factory=lambda: [1])
    migrate: list[bool] = field(default_factory=lambda: [False])
    migrate_every: int = 1
    tier_overlap: list[bool] = field(default_factory=lambda: [False])
    zero: list[int] = field(default_factory=lambda: [0])
    recompute: list[bool] = field(default_factory=lambda: [False])


def in_moeflow(layout: Layout) -> bool:
    """Whether `moeflow train` can run this layout today (everything else is a model of a planned feature)."""
    return (layout.pp == 1 and layout.replicas == 0 and layout.overlap == 1 and not layout.migrate
            and not layout.tier_overlap and not layout.recompute and layout.zero == 0)


def candidate_eps(model: ModelShape, cluster: Cluster, world: int, pp: int) -> list[int]:
    """EP sizes that divide the experts and the data-parallel size and nest in nodes/domains."""
    if world % pp:
        return []
    dp = world // pp
    out = []
    for ep in range(1, min(dp, model.num_experts) + 1):
        if model.num_experts % ep or dp % ep:
            continue
        try:
            geometry(cluster, Layout(ep=ep, pp=pp), world)
        except SimError:
            continue
        out.append(ep)
    return out


def layouts(model: ModelShape, cluster: Cluster, world: int, search: Search) -> list[Layout]:
    """Every combination of the searched options that is valid for this model (padded only with a capacity)."""
    out = []
    for pp, m, sched in itertools.product(search.pp, search.microbatches, search.schedule):
        if sched == "dualpipe" and (pp % 2 or pp == 1):
            continue
        eps = search.ep if search.ep is not None else candidate_eps(model, cluster, world, pp)
        for ep, mode, hier, rep, ov, mig, tov, zero, rc in itertools.product(
                eps, search.modes, search.hierarchical, search.replicas, search.overlap, search.migrate,
                search.tier_overlap, search.zero, search.recompute):
            if mode == "padded" and model.capacity_factor is None:
                continue
            if hier and model.num_experts // ep < model.top_k:
                continue
            if (mig and ep <= cluster.ranks_per_domain) or (tov and ep <= cluster.ranks_per_node):
                continue  # nothing to migrate / only one tier in the group
            if ep == 1 and (rep or hier or mode != "variable" or ov > 1):
                continue  # one rank per group: no all-to-all, these options change nothing
            out.append(Layout(ep=ep, pp=pp, microbatches=m, schedule=sched, mode=mode, hierarchical=hier,
                              replicas=rep, overlap=ov, migrate=mig, migrate_every=search.migrate_every,
                              tier_overlap=tov, zero=zero, recompute=rc))
    return out


@dataclass
class Plan:
    """Ranked predictions and the reasons for the order."""

    ranked: list[Prediction]  # fits in memory, fastest first
    rejected: list[tuple[Layout, str]]  # did not fit (or were invalid), with why
    world: int

    def explain(self) -> list[str]:
        """Why the winner wins: its dominant term, and what the runner-up loses on."""
        if not self.ranked:
            return ["no layout fits: " + "; ".join(f"{lay.label()}: {why}" for lay, why in self.rejected[:3])]
        w = self.ranked[0]
        share = {k: v / w.step for k, v in w.breakdown.items() if k != "overlap_saved" and v > 0}
        top = sorted(share.items(), key=lambda kv: -kv[1])[:3]
        lines = [f"winner {w.layout.label()}: {fmt_time(w.step)} per step; "
                 + ", ".join(f"{k} {100 * v:.0f}%" for k, v in top)]
        if w.a2a_tiers:
            tot = sum(w.a2a_tiers.values()) or 1.0
            lines.append("  its token all-to-all by tier: " + ", ".join(
                f"{t} {100 * v / tot:.0f}%" for t, v in w.a2a_tiers.items()))
        if len(self.ranked) > 1:
            r = self.ranked[1]
            diff = {k: r.breakdown.get(k, 0.0) - w.breakdown.get(k, 0.0) for k in w.breakdown if k != "overlap_saved"}
            k = max(diff, key=lambda x: diff[x])
            lines.append(f"  runner-up {r.layout.label()}: {fmt_time(r.step)} (+{100 * (r.step / w.step - 1):.1f}%), "
                         f"mostly {k} (+{fmt_time(diff[k])})")
        if not in_moeflow(w.layout):
            best_real = next((p for p in self.ranked if in_moeflow(p.layout)), None)
            if best_real is not None:
                lines.append(f"  the winner uses options moeflow models but does not run yet; the best layout "
                             f"moeflow runs today: {best_real.layout.label()} ({fmt_time(best_real.step)})")
        return lines


def plan(model: ModelShape, cluster: Cluster, work: Workload, world: int, search: Search | None = None,
         check_memory: bool = True) -> Plan:
    """Simulate every candidate layout; rank those that fit by predicted step time."""
    search = search or Search()
    if world < 1:
        raise SimError(f"world must be a positive number of ranks, got {world}")
    loads = layer_loads(work.traffic, model)
    cands = layouts(model, cluster, world, search)
    if not cands:
        raise SimError(f"no valid layout for {model.name} on {world} ranks of {cluster.name}: ep must divide "
                       f"num_experts={model.num_experts} and world/pp, and nest in nodes of "
                       f"{cluster.ranks_per_node}; options searched: {search}")
    ranked, rejected = [], []
    for lay in cands:
        try:
            p = simulate(model, cluster, work, lay, world, loads)
        except SimError as e:
            rejected.append((lay, str(e)))
            continue
        if check_memory and not p.fits:
            need = sum(p.memory.values()) / 2**30
            rejected.append((lay, f"needs {need:.1f} GiB per rank > {cluster.memory_GiB:g} GiB"))
            continue
        ranked.append(p)
    if check_memory and not ranked and rejected and all("GiB" in why for _, why in rejected):
        best = min(rejected, key=lambda lr: float(lr[1].split()[1]))
        raise SimError(f"the cluster is too small for {model.name}: no layout on {world} ranks fits in "
                       f"{cluster.memory_GiB:g} GiB per rank (best: {best[0].label()} {best[1]}); use more ranks, "
                       "pipeline stages (--pp), activation recomputation or fewer tokens per rank")
    ranked.sort(key=lambda p: p.step)
    return Plan(ranked, rejected, world)


def payback(old: Prediction, new: Prediction, model: ModelShape, cluster: Cluster, work: Workload) -> dict[str, Any]:
    """Bytes and time to move to `new`'s placement, and the steps after which the faster step repays it."""
    state = work.param_bytes + work.optimizer_bytes
    moved_experts = 0.0
    tier = "node"
    if new.migrated:
        # each domain receives the migrated experts homed elsewhere, over its one WAN link
        g = geometry(cluster, new.layout, new.world)
        moved_experts = new.migrated * (g.domains - 1) / g.domains * model.moe_layers
        t = moved_experts * model.expert_params * state / (cluster.tier("wan").bandwidth_GBps * 1e9)
        tier = "wan"
    elif new.layout.replicas:
        g = geometry(cluster, new.layout, new.world)
        tier = "wan" if g.domains > 1 else "domain" if g.per_domain > g.per_node else "node"
        moved_experts = new.layout.replicas * model.moe_layers  # per rank: its extra slots are filled once
        t = moved_experts * model.expert_params * state / cluster.rank_bandwidth(tier)
    else:
        t = 0.0
    gain = old.step - new.step
    return {"bytes_per_link": moved_experts * model.expert_params * state, "tier": tier, "migrate_s": t,
            "gain_per_step_s": gain, "payback_steps": (t / gain) if gain > 0 else None}  # None: never repaid


def fmt_time(s: float) -> str:
    """Seconds with a unit that keeps 3 significant digits."""
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def breakdown_table(preds: list[Prediction], top: int = 10) -> list[str]:
    """The ranked table: step time, a2a share, each term, memory, imbalance and whether moeflow runs it."""
    head = (f"{'#':>2} {'layout':<42}{'step':>10}{'a2a%':>6}{'expert':>9}{'dense':>9}{'a2a':>9}{'small':>8}"
            f"{'grad':>9}{'bubble':>8}{'mig':>8}{'GiB':>7}{'imb':>6}{'drop%':>6} moeflow")
    lines = [head]
    for i, p in enumerate(preds[:top], 1):
        b = p.breakdown
        lines.append(f"{i:>2} {p.layout.label():<42}{fmt_time(p.step):>10}{100 * p.a2a_share:>6.1f}"
                     f"{fmt_time(b['expert']):>9}{fmt_time(b['dense']):>9}{fmt_time(b['a2a']):>9}"
                     f"{fmt_time(b['small_a2a']):>8}{fmt_time(b['grad_sync']):>9}{fmt_time(b['bubble']):>8}"
                     f"{fmt_time(b['migrate_sync']):>8}{p.memory_total / 2**30:>7.1f}"
                     f"{p.imbalance:>6.2f}{100 * p.dropped:>6.1f} {'yes' if in_moeflow(p.layout) else 'modelled'}")
    return lines


def loads_summary(work: Workload, model: ModelShape) -> str:
    """One line on the traffic: its kind and the worst max/mean expert load."""
    loads = layer_loads(work.traffic, model)
    worst = max(float(ld.max() * ld.size) for ld in loads)
    return f"traffic {work.traffic.kind}: {len(loads)} load vector(s), worst expert max/mean {worst:.2f}"


__all__ = ["Search", "Plan", "plan", "layouts", "payback", "breakdown_table", "fmt_time", "in_moeflow",
           "candidate_eps", "loads_summary"]
