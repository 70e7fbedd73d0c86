"""Expert similarity, clustering and compressed experts: definitions on hand-made examples, full-rank exactness,
forward and gradients against a per-expert fp64 reference, the compress -> save -> load -> eval round trip, and the
bad-input errors."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from moeflow.analysis.similarity import (cluster_agglomerative, cluster_kmedoids, cluster_random, cosine_matrix,
                                         functional_similarity, fused_similarity, structural_similarity)
from moeflow.cli import main
from moeflow.compress import CompressedExperts, CompressError, Layout, fit_experts, layout_params, seed_ratio
from moeflow.compress.fit import match_hidden_units, permute_expert, split_projections
from moeflow.config import MoEConfig
from moeflow.experts import GroupedExperts
from moeflow.layers import MoELayer
from moeflow.ops.rows import ExpertRows, TokenRows
from moeflow.routing.base import Routing

E, D, H = 6, 12, 12  # D == H: every projection is square, so full rank is the same for all (shared V included)


def _experts(seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    return GroupedExperts(E, D, H, "swiglu").double()


def _rows(splits: list[int]) -> ExpertRows:
    return ExpertRows(splits, torch.tensor(splits))


def _reference(w_in: torch.Tensor, w_out: torch.Tensor, x: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Per-expert loop: y = (silu(x Wg^T) * x Wu^T) Wd^T on each expert's block of rows."""
    out, start = [], 0
    for e, n in enumerate(splits):
        xe = x[start:start + n]
        h = xe @ w_in[e].t()
        out.append((torch.nn.functional.silu(h[:, :H]) * h[:, H:]) @ w_out[e].t())
        start += n
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ similarity
def test_structural_similarity_on_hand_made_weights() -> None:
    w_in = torch.zeros(3, 2, 2)
    w_out = torch.zeros(3, 2, 1)
    w_in[0, 0, 0] = 1.0
    w_in[1, 0, 0] = 2.0  # a scaled copy of expert 0: cosine 1
    w_in[2, 1, 1] = 1.0  # orthogonal to both
    s = structural_similarity(w_in, w_out)
    assert torch.allclose(s, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=s.dtype))
    w_in[2, 0, 0] = -1.0  # now anti-parallel to expert 0 in the first entry, plus an orthogonal part
    assert math.isclose(float(structural_similarity(w_in, w_out)[0, 2]), -1 / math.sqrt(2), rel_tol=1e-12)


def _routing(logits: torch.Tensor, experts_N: list[int], tokens_N: list[int], kept_N: list[bool]) -> Routing:
    n = len(experts_N)
    return Routing(torch.tensor(tokens_N), torch.tensor(experts_N), torch.ones(n), torch.ones(n, dtype=torch.bool),
                   torch.tensor(kept_N), logits.softmax(-1), logits, logits.shape[0], logits.shape[1], 1, None)


def test_functional_similarity_is_the_cosine_of_mean_logits_of_kept_tokens() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    # expert 0 gets tokens 0 and 2 (mean [2, 1, 0]); expert 1 token 1 ([0, 2, 0]); token 3 -> expert 2 is dropped
    r = _routing(logits, [0, 1, 0, 2], [0, 1, 2, 3], [True, True, True, False])
    s_f, counts = functional_similarity([r], 3)
    assert counts.tolist() == [2.0, 1.0, 0.0]
    assert math.isclose(float(s_f[0, 1]), 1 / math.sqrt(5), rel_tol=1e-12)
    assert float(s_f[0, 2]) == 0.0 and float(s_f[2, 2]) == 1.0  # no tokens: no centroid, similar only to itself
    # two records add up like one
    r1 = _routing(logits[:2], [0, 1], [0, 1], [True, True])
    r2 = _routing(logits[2:3], [0], [0], [True])
    assert torch.allclose(functional_similarity([r1, r2], 3)[0][:2, :2], s_f[:2, :2])
    s = fused_similarity(torch.eye(3, dtype=torch.float64), s_f, alpha=0.25)
    assert math.isclose(float(s[0, 1]), 0.75 / math.sqrt(5), rel_tol=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        fused_similarity(s, s, alpha=1.5)


def _block_similarity() -> torch.Tensor:
    """Two obvious blocks {0, 2, 4} and {1, 3, 5} with noise."""
    g = torch.Generator().manual_seed(3)
    lab = torch.tensor([0, 1, 0, 1, 0, 1])
    v = torch.nn.functional.one_hot(lab, 2).double() * 3 + 0.3 * torch.randn(6, 2, generator=g, dtype=torch.float64)
    return cosine_matrix(v)


@pytest.mark.parametrize("method", ["kmedoids", "agglomerative"])
def test_clustering_finds_blocks_is_balanced_and_deterministic(method: str) -> None:
    s = _block_similarity()
    fn = (lambda s, g: cluster_kmedoids(s, g, seed=5)) if method == "kmedoids" else cluster_agglomerative
    group = fn(s, 2)
    assert group == [0, 1, 0, 1, 0, 1] and group == fn(s, 2)
    for g in (3, 4):
        sizes = torch.bincount(torch.tensor(fn(s, g))).tolist()
        assert len(sizes) == g and max(sizes) <= math.ceil(6 / g)
    rnd = cluster_random(6, 3, seed=1)
    assert rnd == cluster_random(6, 3, seed=1) and sorted(torch.bincount(torch.tensor(rnd)).tolist()) == [2, 2, 2]
    with pytest.raises(ValueError, match="groups"):
        fn(s, 7)


# ------------------------------------------------------------------------------------------ compressed experts
LAYOUTS = [Layout((0, 1, 0, 2, 1, 2), H), Layout((0, 1, 0, 2, 1, 2), H, shared_v=True),
           Layout(tuple(range(E)), H, base=False), Layout((0,) * E, H, base=False, shared_v=True)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["base", "base-sharedV", "svd", "svd-sharedV"])
def test_full_rank_reproduces_the_original_layer(layout: Layout) -> None:
    ex = _experts()
    splits = [3, 0, 5, 2, 4, 1]
    x = torch.randn(sum(splits), D, dtype=torch.float64)
    ref = ex(x, _rows(splits))
    comp = fit_experts(ex.w_in, ex.w_out, "swiglu", layout)
    assert torch.allclose(comp(x, _rows(splits)), ref, atol=1e-10, rtol=0)
    w_in, w_out = comp.dense_weights()  # hidden units are permuted by alignment: compare functions, not weights
    assert torch.allclose(_reference(w_in, w_out, x, splits), ref, atol=1e-10, rtol=0)


def test_low_rank_error_shrinks_with_rank_and_alignment_preserves_function() -> None:
    ex = _experts()
    projs = split_projections(ex.w_in.detach(), ex.w_out.detach(), "swiglu")
    perm = match_hidden_units(torch.randn(H, 3 * D, dtype=torch.float64), torch.randn(H, 3 * D, dtype=torch.float64))
    assert sorted(perm.tolist()) == list(range(H))  # a permutation
    moved = permute_expert(projs, 1, perm)
    x = torch.randn(5, D, dtype=torch.float64)
    w_in = torch.cat([moved["gate"], moved["up"]]).unsqueeze(0)
    assert torch.allclose(_reference(w_in, moved["down"].unsqueeze(0), x, [5]),
                          _reference(ex.w_in[1:2], ex.w_out[1:2], x, [5]), atol=1e-12)
    splits = [4] * E
    x = torch.randn(sum(splits), D, dtype=torch.float64)
    ref = ex(x, _rows(splits))
    with torch.no_grad():
        errs = [float((fit_experts(ex.w_in, ex.w_out, "swiglu", Layout((0, 0, 0, 1, 1, 1), r))(x, _rows(splits))
                       - ref).norm()) for r in (1, 4, 8, H)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-10


def test_forward_and_gradients_match_per_expert_reference_in_fp64_with_token_map() -> None:
    """The token-major path (rows.tokens + weights_R), groups not contiguous, a pruned expert: vs a loop."""
    ex = _experts(1)
    layout = Layout((1, 0, 0, -1, 1, 2), 3)
    comp = fit_experts(ex.w_in, ex.w_out, "swiglu", layout)
    for p in comp.parameters():  # move off the fitted point so every parameter's gradient is generic
        p.data.add_(0.01 * torch.randn_like(p))
    t, k = 7, 2
    gen = torch.Generator().manual_seed(0)
    experts_TK = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(t)])
    flat = experts_TK.t().reshape(-1)  # slot-major assignments n = s*T + t
    order = torch.argsort(flat, stable=True)
    token_R = (torch.arange(k * t) % t)[order]
    splits = torch.bincount(flat, minlength=E).tolist()
    w_R = torch.rand(k * t, dtype=torch.float64, requires_grad=True)
    x = torch.randn(t, D, dtype=torch.float64, requires_grad=True)
    rows = ExpertRows(splits, torch.tensor(splits), TokenRows.from_slot_major(token_R, order, k, t), w_R)
    y = comp(x, rows)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w_R, *comp.parameters()], gy)
    # reference: effective dense weights, explicit per-row loop, pruned expert's rows give zero
    params = dict(comp.named_parameters())

    def ref_fn(x_: torch.Tensor, w_: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        named = dict(zip(params, ps))
        out = torch.zeros(t, D, dtype=torch.float64)
        start = 0
        for e, n in enumerate(splits):
            g = layout.group_E[e]
            if g < 0:
                start += n
                continue
            s = comp.slots.index(e)
            w = {p: named[f"{p}_base"][g] + named[f"{p}_u"][s] @ named[f"{p}_v"][s] for p in ("gate", "up", "down")}
            for r in range(start, start + n):
                xr = x_[token_R[r]]
                hr = torch.nn.functional.silu(w["gate"] @ xr) * (w["up"] @ xr)
                out = out.index_add(0, token_R[r:r + 1], (w_[r] * (w["down"] @ hr)).unsqueeze(0))
            start += n
        return out

    ps = [p.detach().clone().requires_grad_(True) for p in comp.parameters()]
    xr, wr = x.detach().clone().requires_grad_(True), w_R.detach().clone().requires_grad_(True)
    yr = ref_fn(xr, wr, *ps)
    assert torch.allclose(y, yr, atol=1e-12)
    grads_ref = torch.autograd.grad(yr, [xr, wr, *ps], gy)
    for (name, _), a, b in zip([("x", 0), ("w", 0), *params.items()], grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-11), name


def test_compressed_experts_drop_into_a_moe_layer_and_train() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, d_model=16, d_hidden=8, top_k=2)
    layer = MoELayer(cfg).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = layer(x)
    layer.experts = fit_experts(layer.experts.w_in, layer.experts.w_out, cfg.activation, Layout((0, 1, 0, 1), 8))
    assert torch.allclose(layer(x), ref, atol=1e-10)
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts.parameters())


def test_parameter_arithmetic_and_the_seed_formula() -> None:
    d, k, r = 4096, 8, 16
    assert math.isclose(seed_ratio(k, r, {"w": (d, d)}), k / (1 + 2 * k * r / d), rel_tol=1e-12)
    assert round(seed_ratio(k, r, {"w": (d, d)}), 2) == 7.53  # the seed's 6.6x is not what its formula gives
    lay = Layout((0,) * k, r)
    assert layout_params(lay, {"w": (d, d)}) == d * d + 2 * k * d * r
    assert layout_params(Layout((0, 0, 1), 2, shared_v=True), {"w": (3, 5)}) == 2 * 15 + 2 * 2 * 5 + 3 * 3 * 2


def test_bad_layouts_and_ranks_raise() -> None:
    with pytest.raises(ValueError, match="0..G-1"):
        Layout((0, 2, 2), 1)
    with pytest.raises(ValueError, match="at least one kept"):
        Layout((-1, -1), 0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        Layout((0, 1), 0, base=False)
    ex = _experts()
    with pytest.raises(ValueError, match="larger than the expert matrices"):
        fit_experts(ex.w_in, ex.w_out, "swiglu", Layout((0,) * E, H + 1))


# --------------------------------------------------------------------------------------------- the command
TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
        "--set", "model.n_kv_heads=1", "--set", "model.max_seq_len=48", "--set", "model.ffn_hidden=64",
        "--set", "model.moe.d_hidden=32", "--set", "model.moe.num_experts=4", "--set", "train.batch_size=4",
        "--set", "train.seq_len=16", "--set", "train.eval_every=3", "--set", "train.eval_batches=2",
        "--set", "train.warmup=2"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step tiny LM run."""
    tmp = tmp_path_factory.mktemp("lm")
    data = tmp / "data.txt"
    data.write_text(inspect.getsource(json) * 3)
    assert main(["train", "--data", str(data), "--out", str(tmp), "--name", "run", "--max-steps", "6", "--quiet",
                 *TINY]) == 0
    return tmp / "run"


@pytest.mark.parametrize("method", ["base-lowrank", "merge", "svd-shared", "svd", "prune", "random"])
def test_compress_save_load_eval_round_trip(lm_run: Path, tmp_path: Path, method: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    extra = ["--finetune", "2"] if method == "base-lowrank" else []
    assert main(["compress", "--run", str(lm_run), "--method", method, "--ratio", "0.5", "--out", str(out),
                 "--calib-batches", "2", *extra]) == 0
    printed = capsys.readouterr().out
    rec = json.loads((out / "compression.json").read_text())
    assert "expert parameters" in printed and "bytes" in printed and 0 < rec["ratio"] <= 0.5
    assert main(["eval", "--run", str(out)]) == 0
    bpb = float(capsys.readouterr().out.split("nats/byte, ")[1].split(" bits")[0])
    want = rec["quality_finetuned" if extra else "quality_after"]["val_bpb"]
    assert math.isclose(bpb, want, rel_tol=1e-5), (bpb, want)
    assert main(["generate", "--run", str(out), "--prompt", "de", "--max-new-tokens", "4"]) == 0
    if method == "prune":
        assert json.loads((out / "config.json").read_text())["model"]["moe"]["router_bias"] is True
    # never overwrite: the same --out again is refused, and the source run is untouched
    assert main(["compress", "--run", str(lm_run), "--method", method, "--ratio", "0.5", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_similarity_only_writes_heat_maps(lm_run: Path, tmp_path: Path) -> None:
    assert main(["compress", "--run", str(lm_run), "--similarity-only", "--out", str(tmp_path / "s"),
                 "--calib-batches", "1"]) == 0
    sim = json.loads((tmp_path / "s" / "similarity.json").read_text())
    assert len(sim) == 2 and all(len(v["s_f"]) == 4 for v in sim.values())
    assert "S^f" in (tmp_path / "s" / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--method", "base-lowrank", "--ratio", "0"], "strictly between 0 and 1"),
    (["--method", "base-lowrank", "--ratio", "1.0"], "strictly between 0 and 1"),
    (["--method", "svd", "--ratio", "0.5", "--rank", "999"], "larger than the expert matrices"),
    (["--method", "squash", "--ratio", "0.5"], "unknown method 'squash'"),
    (["--ratio", "0.5"], "--method and --ratio are required"),
    (["--method", "svd", "--ratio", "0.5", "--rank", "-1"], "--rank must be >= 1"),
    (["--method", "merge", "--ratio", "0.5", "--alpha", "2"], "--alpha must lie in [0, 1]"),
])
def test_bad_input_gets_a_clear_error(lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      args: list[str], message: str) -> None:
    assert main(["compress", "--run", str(lm_run), "--out", str(tmp_path / "x"), "--calib-batches", "1",
                 *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_dense_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.txt"
    data.write_text(inspect.getsource(json) * 3)
    assert main(["train", "--preset", "tiny-dense", "--data", str(data), "--out", str(tmp_path), "--name", "d",
                 "--max-steps", "1", "--quiet",
                 "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
                 "--set", "model.n_kv_heads=1", "--set", "model.ffn_hidden=64", "--set", "train.batch_size=2",
                 "--set", "train.seq_len=16", "--set", "train.eval_batches=1"]) == 0
    assert main(["compress", "--run", str(tmp_path / "d"), "--method", "svd", "--ratio", "0.5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "dense run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ re-clustering
def test_reclustering_projection_leaves_the_layer_unchanged_at_full_rank() -> None:
    from moeflow.compress.recluster import project_to_groups

    ex = _experts(2)
    comp = fit_experts(ex.w_in, ex.w_out, "swiglu", Layout((0, 0, 0, 1, 1, 1), H))
    for p in comp.parameters():  # as if trained after the first grouping
        p.data.add_(0.05 * torch.randn_like(p))
    splits = [2, 3, 1, 4, 2, 3]
    x = torch.randn(sum(splits), D, dtype=torch.float64)
    before = comp(x, _rows(splits))
    new = project_to_groups(comp, (0, 1, 2, 0, 1, 2))
    assert new.layout.group_E == (0, 1, 2, 0, 1, 2)
    assert torch.allclose(new(x, _rows(splits)), before, atol=1e-10, rtol=0)
    # below full rank the projection is the best rank-r fit of the same effective weights, not a re-initialisation
    low = project_to_groups(fit_experts(ex.w_in, ex.w_out, "swiglu", Layout((0, 0, 0, 1, 1, 1), 4)),
                            (0, 1, 2, 0, 1, 2))
    with torch.no_grad():
        assert float((low(x, _rows(splits)) - ex(x, _rows(splits))).norm()) < float(ex(x, _rows(splits)).norm())


def test_recluster_during_finetune_is_logged(lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rc"
    assert main(["compress", "--run", str(lm_run), "--method", "random", "--ratio", "0.75", "--out", str(out),
                 "--calib-batches", "1", "--finetune", "4", "--recluster-every", "2"]) == 0
    assert "re-clustering: 2 checks" in capsys.readouterr().out
    rec = json.loads((out / "compression.json").read_text())
    assert [h["step"] for h in rec["recluster_history"]] == [2, 4]
    assert main(["eval", "--run", str(out)]) == 0  # the saved layouts are the final groups


def test_cluster_placement_keeps_clusters_on_one_rank_and_relabelling_keeps_the_function() -> None:
    from moeflow.compress.placement import cluster_placement, relabel_experts

    pl = cluster_placement([0, 1, 0, 1, 2, 2, 3, 3], ep=2)
    assert sorted(pl.order) == list(range(8)) and pl.split == 0
    for g in range(4):
        assert len({pl.rank_E[pl.order.index(x)] for x in range(8) if [0, 1, 0, 1, 2, 2, 3, 3][x] == g}) == 1
    assert cluster_placement([0, 0, 0, 1, 1, 1], ep=2).split == 0
    assert cluster_placement([0, 0, 0, 0, 1, 1], ep=3).split == 1  # a cluster of 4 cannot fit 2 slots
    with pytest.raises(ValueError, match="divisors"):
        cluster_placement([0, 1, 2], ep=2)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=8, d_model=16, d_hidden=8, top_k=2)).double()
    x = torch.randn(10, 16, dtype=torch.float64)
    ref = layer(x)
    relabel_experts(layer, pl.order)
    assert torch.allclose(layer(x), ref, atol=1e-12)


def test_translation_run_compresses_and_translates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--task", "translate", "--preset", "tiny", "--max-steps", "3", "--set", "eval_sentences=2",
                 "--out", str(tmp_path), "--name", "tr", "--quiet"]) == 0
    out = tmp_path / "tr-prune"
    assert main(["compress", "--run", str(tmp_path / "tr"), "--method", "prune", "--ratio", "0.5", "--out", str(out),
                 "--calib-batches", "1"]) == 0
    assert "cer" in capsys.readouterr().out
    assert main(["translate", "--run", str(out), "--to", "cip", "--text", "the value is here"]) == 0
    assert "<2cip> 'the value is here' ->" in capsys.readouterr().out
