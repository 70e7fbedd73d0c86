"""Cluster-scale expert-parallel simulator and planner (numpy only): what each layout costs, and which to choose.

    spec     model shape, cluster, workload and layout (JSON files, presets)
    traffic  per-expert loads, placement (contiguous, EPLB replicas), exact and expected rows per rank pair
    cost     the α-β model: a2a per tier, expert compute, pipeline bubbles, gradient sync, memory -> step time
    planner  enumerate layouts, rank by predicted step time, explain the winner, migration payback
"""

from moeflow.sim.cost import Prediction, simulate
from moeflow.sim.planner import Plan, Search, plan
from moeflow.sim.spec import (CLUSTER_PRESETS, MODEL_SHAPES, Cluster, Layout, ModelShape, SimError, Tier, Traffic,
                              Workload, load_cluster, load_workload)

__all__ = ["Prediction", "simulate", "Plan", "Search", "plan", "CLUSTER_PRESETS", "MODEL_SHAPES", "Cluster",
           "Layout", "ModelShape", "SimError", "Tier", "Traffic", "Workload", "load_cluster", "load_workload"]
