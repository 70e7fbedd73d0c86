"""`moeflow plan` end to end, in-process, on the shipped examples and presets; errors exit 2 without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.cli import main
from moeflow.cli.plan import fit_alpha_beta, load_model
from moeflow.sim import SimError
from moeflow.sim.spec import example_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(['plan', ...]) -> (exit code, stdout, stderr)."""
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_on_presets(capsys: pytest.CaptureFixture[str]) -> None:
    """Switch-C on 2,048 H100s: a ranked table (fastest first), the explanation, options moeflow lacks flagged."""
    code, out, err = run(capsys, "--model", "switch-c-2048", "--cluster", "dgx-h100", "--ranks", "2048",
                         "--tokens", "4096", "--replicas", "0,1", "--overlap", "1,2")
    assert code == 0, err
    assert "switch-c-2048" in out and "winner ep" in out
    steps = [line.split()[-12:-11] for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(steps) >= 3
    assert "modelled" in out and " yes" in out


def test_json_and_plot_on_shipped_examples(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Example files for each input; --json is machine-readable and sorted; --plot writes a PNG."""
    png = tmp_path / "b.png"
    code, out, err = run(capsys, "--model", str(example_path("model-hf-mixtral.json")),
                         "--cluster", str(example_path("cluster-2dc-h100.json")),
                         "--workload", str(example_path("workload-zipf.json")), "--ranks", "1024",
                         "--migrate", "--json", "--plot", str(png), "--zero", "1", "--recompute")
    assert code == 0, err
    d = json.loads(out)
    steps = [p["step_s"] for p in d["ranked"]]
    assert steps == sorted(steps) and steps[0] > 0
    assert d["model"]["num_experts"] == 8 and d["model"]["top_k"] == 2
    assert {"a2a", "expert", "grad_sync"} <= set(d["ranked"][0]["breakdown_s"])
    assert png.stat().st_size > 1000


def test_model_formats_agree() -> None:
    """The simulator's file, the preset, a moeflow run config and moeflow presets all load."""
    assert load_model(str(example_path("model-switch-c-2048.json"))) == load_model("switch-c-2048")
    run_cfg = load_model(str(example_path("model-moeflow-run-config.json")))
    tiny = load_model("tiny")
    assert (run_cfg.num_experts, run_cfg.top_k, run_cfg.d_expert) == (tiny.num_experts, tiny.top_k, tiny.d_expert)
    mix = load_model(str(example_path("model-hf-mixtral.json")))
    assert (mix.d_model, mix.n_layers, mix.num_experts, mix.d_expert) == (4096, 32, 8, 14336)


def test_metrics_workload(capsys: pytest.CaptureFixture[str]) -> None:
    """A workload pointing at a moeflow run's metrics.jsonl plans the run's own model."""
    code, out, err = run(capsys, "--model", str(example_path("model-moeflow-run-config.json")),
                         "--cluster", "dgx-h100", "--ranks", "16",
                         "--workload", str(example_path("workload-metrics.json")))
    assert code == 0, err
    assert "traffic metrics: 4 load vector(s)" in out


@pytest.mark.parametrize("argv,needle", [
    (["--model", "switch-c-2049", "--cluster", "dgx-h100", "--ranks", "64"], "did you mean switch-c-2048"),
    (["--model", "switch-c-2048", "--cluster", "dgx-h10", "--ranks", "64"], "did you mean dgx-h100"),
    (["--model", "switch-c-2048", "--cluster", "dgx-h100", "--ranks", "16"], "cluster is too small"),
    (["--model", "tiny", "--cluster", "dgx-h100", "--ranks", "16", "--ep", "3"], "ep=3 must divide"),
    (["--model", "tiny", "--cluster", "dgx-h100", "--ranks", "64", "--domains", "3"], "must divide the 8 nodes"),
    (["--model", "tiny", "--cluster", "dgx-h100", "--ranks", "64", "--domains", "2", "--wan-gbit", "0"],
     "--wan-gbit must be > 0"),
    (["--model", "tiny", "--cluster", "dgx-h100", "--ranks", "x"], "--ranks must be comma-separated integers"),
    (["--model", "tiny-dense", "--cluster", "dgx-h100", "--ranks", "8"], "is dense"),
    (["--model", "tiny", "--cluster", "dgx-h100"], "needs --model, --cluster and --ranks"),
])
def test_bad_inputs_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    """Each bad input is one 'moeflow plan: error: ...' line naming the problem, exit code 2."""
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("moeflow plan: error:") and needle in err and "Traceback" not in err


def test_bad_files_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A cluster file with bandwidth 0, a model file of no known format."""
    c = json.loads(example_path("cluster-2dc-h100.json").read_text())
    c["domain"]["bandwidth_GBps"] = 0
    (tmp_path / "c.json").write_text(json.dumps(c))
    code, _, err = run(capsys, "--model", "tiny", "--cluster", str(tmp_path / "c.json"), "--ranks", "16")
    assert code == 2 and "bandwidth_GBps must be a finite number > 0" in err
    (tmp_path / "m.json").write_text(json.dumps({"hello": 1}))
    code, _, err = run(capsys, "--model", str(tmp_path / "m.json"), "--cluster", "dgx-h100", "--ranks", "16")
    assert code == 2 and "none of the known formats" in err


def test_list_presets(capsys: pytest.CaptureFixture[str]) -> None:
    """--list-presets names every model and cluster preset."""
    code, out, _ = run(capsys, "--list-presets")
    assert code == 0 and "gshard-600b" in out and "hgx-h800" in out and "mixtral-8x7b" in out


def test_fit_alpha_beta() -> None:
    """Least squares recovers alpha and beta from exact points; a flat curve is refused."""
    a, b = fit_alpha_beta([(1e3, 1e-3 + 1e3 / 2e9), (1e6, 1e-3 + 1e6 / 2e9), (4e6, 1e-3 + 4e6 / 2e9)])
    assert a == pytest.approx(1e-3) and b == pytest.approx(2e9)
    with pytest.raises(SimError, match="no growth"):
        fit_alpha_beta([(1e3, 1e-3), (1e6, 1e-3)])


@pytest.mark.hf
@pytest.mark.parametrize("arch,experts,top_k,moe_layers,groups", [
    ("mixtral", 4, 2, 2, 1), ("qwen2_moe", 4, 2, 1, 1), ("olmoe", 4, 2, 2, 1), ("deepseek_v3", 8, 2, 1, 4),
    ("switch_transformers", 4, 1, 2, 1)])
def test_hf_config_files_load(tmp_path: Path, arch: str, experts: int, top_k: int, moe_layers: int,
                              groups: int) -> None:
    """Each HF architecture's config.json becomes a ModelShape with its experts, top-k, MoE layers and groups."""
    pytest.importorskip("transformers")
    from test_hf_common import hf_config

    p = tmp_path / "config.json"
    p.write_text(json.dumps(hf_config(arch).to_dict()))
    m = load_model(str(p))
    assert (m.num_experts, m.top_k, m.moe_layers, m.route_groups) == (experts, top_k, moe_layers, groups)
