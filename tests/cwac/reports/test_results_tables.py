"""The table builder on fixture records: numbers (mean, sample std, per-seed averages), bold
best per column and block, layout, and which records count (complete finetune only)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from cwac.reports.build import build, main
from cwac.reports.collect import load_results, read_train_log
from cwac.reports.tables import ratio_table, task_table, to_latex, to_markdown


def _config(model: str, task: str, p: float, method: str, seed: int, **extra) -> dict:
    cfg = {
        "model": {"name": model, "align": extra.pop("align", True), "dtype": "float32"},
        "task": {"name": task, "source": "local"},
        "harmful": {"ratio": p, "n_total": extra.pop("n_total", 400), "source": "local"},
        "method": {"name": method, **extra.pop("method_params", {})},
        "alignment": {"seed": 0, "n_harmful": 300, "method": {"name": extra.pop("align_method", "sft")}},
        "training": {"lr": 2e-5, "epochs": 1, "micro_batch_size": 8, "gradient_accumulation_steps": 1,
                     "max_len": 256, "lora": {"enabled": False}, "progress": False},
        "eval": {"hs_sets": ["beavertails_eval", "harmbench_test"], "hs_n": 100, "hs_max_new_tokens": 48,
                 "fa_n": 200, "progress": False},
        "judge": {"name": "keyword"},
        "logger": {"name": "none"},
        "paths": {"runs": "runs", "artifacts": "artifacts"},
        "stage": extra.pop("stage", "finetune"),
        "seed": seed,
        "sweep_name": "ratio_cpu",
    }
    assert not extra, extra
    return cfg


def write_run(root: Path, model="smollm2_135m", task="sst2", p=0.1, method="sft", seed=42, hs=50.0, fa=90.0,
              status="complete", finished="2026-01-01T00:00:00", log=None, record=True, timings=None, host=None,
              **extra) -> Path:
    """A run folder as run_cell leaves it: started.json, record.json (unless killed), train_log."""
    cfg = _config(model, task, p, method, seed, **extra)
    run_dir = root / f"{model}-{task}-p{p:g}-{method}-s{seed}-{abs(hash(json.dumps(cfg, sort_keys=True))) % 10**8:08d}"
    run_dir.mkdir(parents=True)
    base = {"run_dir": str(run_dir), "cell": run_dir.name[:-9], "config": cfg, "seed": seed, "stage": cfg["stage"],
            "git": {"commit": "abc1234def", "dirty": False}, "started": "2026-01-01T00:00:00"}
    (run_dir / "started.json").write_text(json.dumps(base))
    if record:
        rec = {**base, "status": status, "finished": finished}
        if status == "complete":
            rec["metrics"] = {"hs": hs, "fa": fa, "over_refusal": 1.0}
            rec.update({k: v for k, v in (("timings", timings), ("host", host)) if v is not None})
        else:
            rec["error"] = "RuntimeError: boom"
        (run_dir / "record.json").write_text(json.dumps(rec))
    if log:
        (run_dir / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    return run_dir


SFT = {("sst2", 42): (60, 90), ("sst2", 43): (70, 91), ("sst2", 44): (80, 92),
       ("agnews", 42): (40, 80), ("agnews", 43): (50, 82), ("agnews", 44): (60, 84)}
CWAC = {("sst2", 42): (10, 91), ("sst2", 43): (12, 92), ("sst2", 44): (14, 93),
        ("agnews", 42): (20, 79), ("agnews", 43): (22, 80), ("agnews", 44): (30, 81)}


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for method, vals in (("sft", SFT), ("cwac", CWAC)):
        for (task, seed), (hs, fa) in vals.items():
            write_run(root, task=task, method=method, seed=seed, hs=hs, fa=fa)
    return root


def _pm(vals, d=1):
    return f"{statistics.fmean(vals):.{d}f} ± {statistics.stdev(vals):.{d}f}"


def test_main_table_numbers_bold_and_layout(runs):
    results, cov = load_results([runs])
    assert cov.complete == 12 and not cov.failed and not cov.unfinished
    md = to_markdown(task_table(results, "main", "Main", "cap"), decimals=1)
    lines = md.splitlines()
    assert lines[2] == "| Model | Method | SST-2 FA ↑ | SST-2 HS ↓ | AG News FA ↑ | AG News HS ↓ | Avg FA ↑ | Avg HS ↓ | n |"
    # per-seed averages over tasks, then mean ± sample std over the three seeds
    sft_avg_hs = [(SFT["sst2", s][0] + SFT["agnews", s][0]) / 2 for s in (42, 43, 44)]    # 50, 60, 70
    sft_avg_fa = [(SFT["sst2", s][1] + SFT["agnews", s][1]) / 2 for s in (42, 43, 44)]    # 85, 86.5, 88
    cwac_avg_hs = [(CWAC["sst2", s][0] + CWAC["agnews", s][0]) / 2 for s in (42, 43, 44)]  # 15, 17, 22
    cwac_avg_fa = [(CWAC["sst2", s][1] + CWAC["agnews", s][1]) / 2 for s in (42, 43, 44)]  # 85, 86, 87
    # SFT first, CWAC last (paper order); SmolLM2 name only on the first row of its block.
    assert lines[4] == (f"| SmolLM2-135M | SFT | 91.0 ± 1.0 | 70.0 ± 10.0 | **82.0 ± 2.0** | 50.0 ± 10.0 | "
                        f"**{_pm(sft_avg_fa)}** | {_pm(sft_avg_hs)} | 3 |")
    assert lines[5] == (f"|  | CWAC | **92.0 ± 1.0** | **12.0 ± 2.0** | 80.0 ± 1.0 | **{_pm([20, 22, 30])}** | "
                        f"86.0 ± 1.0 | **{_pm(cwac_avg_hs)}** | 3 |")
    assert _pm(cwac_avg_fa) == "86.0 ± 1.0" and _pm(sft_avg_fa) == "86.5 ± 1.5"
    assert lines[-1] == "cap"


def test_bold_is_per_model_block_and_latex_layout(runs):
    for (task, seed), (hs, fa) in SFT.items():   # a second model where SFT is the only method but one
        write_run(runs, model="llama2_7b_chat", task=task, method="sft", seed=seed, hs=hs + 1, fa=fa, align=False)
        write_run(runs, model="llama2_7b_chat", task=task, method="asft", seed=seed, hs=hs + 5, fa=fa - 10,
                  align=False)
    results, _ = load_results([runs])
    table = task_table(results, "main", "Main results", "Caption with 50% and model_name")
    models = [r.labels[0] for r in table.rows]
    assert models == ["Llama-2-7B", "", "SmolLM2-135M", ""]          # paper's model order first
    assert [r.labels[1] for r in table.rows] == ["SFT", "AsFT", "SFT", "CWAC"]
    bold = table.bold(1)
    # Llama block: SFT has the lower HS and the higher FA; SmolLM2 block: CWAC wins SST-2 HS.
    assert (0, "sst2/hs") in bold and (0, "sst2/fa") in bold and (1, "sst2/hs") not in bold
    assert (3, "sst2/hs") in bold and (2, "sst2/hs") not in bold
    tex = to_latex(table, 1)
    assert r"\multicolumn{2}{c}{SST-2} & \multicolumn{2}{c}{AG News} & \multicolumn{2}{c}{Avg}" in tex
    assert r"\cmidrule(lr){3-4}\cmidrule(lr){5-6}\cmidrule(lr){7-8}" in tex
    assert r"Model & Method & FA $\uparrow$ & HS $\downarrow$" in tex
    assert r"Llama-2-7B & SFT & \textbf{91.0 $\pm$ 1.0} & \textbf{71.0 $\pm$ 10.0}" in tex
    assert tex.count(r"\midrule") == 2                                   # header rule + one between models
    assert r"50\% and model\_name" in tex and tex.rstrip().endswith(r"\end{table}")


def test_ties_are_all_bold_and_single_seed_has_no_std(tmp_path):
    root = tmp_path / "runs"
    write_run(root, method="sft", seed=1, hs=30.0, fa=90.0)
    write_run(root, method="cwac", seed=1, hs=30.04, fa=80.0)            # equal at one decimal
    write_run(root, method="cwac", seed=2, hs=29.96, fa=80.0)
    results, _ = load_results([root])
    table = task_table(results, "main", "t", "c")
    md = to_markdown(table, 1).splitlines()
    assert md[4] == "| SmolLM2-135M | SFT | **90.0** | **30.0** | 1 |"
    assert md[5] == "|  | CWAC | 80.0 ± 0.0 | **30.0 ± 0.1** | 2 |"


def test_ratio_table_hs_per_p_and_averages(tmp_path):
    root = tmp_path / "runs"
    hs = {("sft", 0.05): [70, 72], ("sft", 0.1): [78, 80], ("sft", 0.2): [75, 75], ("sft", 0.5): [82, 84],
          ("cwac", 0.05): [10, 12], ("cwac", 0.1): [20, 20], ("cwac", 0.2): [22, 24], ("cwac", 0.5): [30, 32]}
    for (method, p), vals in hs.items():
        for seed, v in zip((42, 43), vals):
            write_run(root, method=method, p=p, seed=seed, hs=v, fa=94.0 + seed - 42 + (p == 0.5))
    write_run(root, method="cwac", p=0.1, seed=44, hs=99.0, fa=0.0, status="failed")   # does not count
    results, cov = load_results([root])
    assert len(cov.failed) == 1
    t = ratio_table(results, "smollm2_135m", "sst2", "ratio-smollm2_135m-sst2", "cap")
    md = to_markdown(t, 2).splitlines()
    assert md[2] == "| Method | HS ↓ p=0.05 | HS ↓ p=0.1 | HS ↓ p=0.2 | HS ↓ p=0.5 | Avg HS ↓ | Avg FA ↑ | n |"
    sft_avg = [statistics.fmean(hs["sft", p][i] for p in (0.05, 0.1, 0.2, 0.5)) for i in (0, 1)]  # 76.25, 77.75
    cwac_avg = [statistics.fmean(hs["cwac", p][i] for p in (0.05, 0.1, 0.2, 0.5)) for i in (0, 1)]
    fa_avg = [94.25, 95.25]
    assert md[4] == (f"| SFT | 71.00 ± 1.41 | 79.00 ± 1.41 | 75.00 ± 0.00 | 83.00 ± 1.41 | {_pm(sft_avg, 2)} | "
                     f"**{_pm(fa_avg, 2)}** | 2 |")
    assert md[5] == (f"| CWAC | **11.00 ± 1.41** | **20.00 ± 0.00** | **23.00 ± 1.41** | **31.00 ± 1.41** | "
                     f"**{_pm(cwac_avg, 2)}** | **{_pm(fa_avg, 2)}** | 2 |")


def test_build_writes_every_table_plot_and_index(tmp_path):
    root = tmp_path / "runs"
    log = [{"step": s, "finetune/losses/task": 2.0 / s, "finetune/losses/cwac_safety": 0.1 * s,
            "finetune/losses/total": 2.0 / s + 0.1 * s, "finetune/metrics/proj_leak": 1e-7, "finetune/lr": 2e-5}
           for s in (1, 2, 3)]
    for p in (0.05, 0.1):
        for method in ("sft", "cwac", "cwac_weight_only", "cwac_act_only"):
            for seed in (42, 43):
                write_run(root, method=method, p=p, seed=seed, hs=10 + seed - 42, fa=90, log=log)
    write_run(root, method="sft", p=0.1, seed=44, record=False)                      # killed
    write_run(root, method="sft", p=0.1, seed=42, stage="align", hs=5.0)             # align record
    write_run(root, method="sft", p=0.1, seed=42, hs=1.0, n_total=200)               # another setting
    out = tmp_path / "results"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "stale.md").write_text("old")
    res = build([root], out)
    names = set(res["tables"])
    assert names == {"main", "ablation", "ratio-smollm2_135m-sst2", f"main-s{_setting(results_of(root), 200)}"}
    assert not (out / "tables" / "stale.md").exists()
    main_md = (out / "tables" / "main.md").read_text()
    assert "| SFT |" in main_md and "CWAC" in main_md and "weight-only" not in main_md  # variants: ablation only
    abl = (out / "tables" / "ablation.md").read_text().splitlines()
    assert [ln.split(" | ")[1] for ln in abl[4:7]] == ["weight-only", "activation-only", "CWAC"]
    other = (out / "tables" / f"main-s{_setting(results_of(root), 200)}.md").read_text()
    assert "harmful.n_total = 200 (main setting: 400)" in other
    for f in ("hs_vs_p-smollm2_135m-sst2.png", "fa_vs_hs-smollm2_135m-sst2.png", "curves-smollm2_135m-sst2-p0.1.png"):
        assert f in res["plots"] and (out / "plots" / f).stat().st_size > 5000
    index = (out / "index.md").read_text()
    assert "unfinished cells (killed or still running; rerun by relaunching): 1" in index
    assert "complete records of other stages (align): 1" in index and "### Component ablation" in index
    assert all((out / "tables" / f"{n}.tex").exists() for n in names)


def test_timings_table_has_each_cells_phases_and_host_in_finishing_order(tmp_path):
    root = tmp_path / "runs"
    host = {"cpu": "AMD EPYC", "cpus": 2, "isa": ["avx2"], "torch_threads": 2, "gpu": None}
    write_run(root, p=0.2, finished="2026-01-01T02:00:00", host=host,
              timings={"total_seconds": 669.4, "train_seconds": 491.7, "seconds_per_step": 4.917, "eval_seconds": 167.2})
    write_run(root, p=0.1, method="cwac", finished="2026-01-01T01:00:00",
              timings={"total_seconds": 889.0, "prepare_seconds": 202.9})
    write_run(root, p=0.5)                                                                 # no timings: no row
    res = build([root], tmp_path / "results", make_plots=False)
    assert "timings" in res["tables"]
    rows = [ln for ln in (tmp_path / "results" / "tables" / "timings.md").read_text().splitlines() if ln.startswith("| SmolLM2")]
    assert len(rows) == 2
    assert "| 0.1 | CWAC | 42 | 889.0 | – | – | 202.9 | not recorded |" in rows[0]
    assert "| 0.2 | SFT | 42 | 669.4 | 491.7 (4.92) | 167.2 | – | AMD EPYC (avx2; 2 threads) |" in rows[1]
    assert "### Cell times" in (tmp_path / "results" / "index.md").read_text()


def test_ratio_plot_draws_multi_ratio_methods_in_distinct_styles(tmp_path):
    from cwac.reports.plots import _styles, hs_vs_p

    styles = _styles([f"m{i}" for i in range(12)] + ["cwac"])
    assert len({(str(st["color"]), st["marker"], st["linestyle"]) for st in styles.values()}) == 13
    assert styles["cwac"]["color"] == "black"   # the paper's method never shares a baseline's colour
    assert sum(st["color"] == styles["m0"]["color"] for st in styles.values()) == 2   # m0 and m10: marker differs
    root = tmp_path / "runs"
    for p in (0.05, 0.1, 0.2):
        write_run(root, method="sft", p=p, hs=80.0, fa=85.0)
        write_run(root, method="cwac", p=p, hs=30.0, fa=85.0)
    write_run(root, method="cwac_act_only", p=0.1, hs=35.0, fa=84.0)   # one ratio only: tables, not lines
    rs = results_of(root)
    drawn = hs_vs_p(rs, rs[0].model, rs[0].task, tmp_path / "hs.png")
    assert drawn == ["sft", "cwac"] and (tmp_path / "hs.png").stat().st_size > 5000
    assert hs_vs_p([r for r in rs if r.p == 0.1], rs[0].model, rs[0].task, tmp_path / "none.png") == []


def results_of(root):
    return load_results([root])[0]


def _setting(results, n_total):
    return next(r.setting for r in results if r.config["harmful"]["n_total"] == n_total)


def test_variants_alignment_methods_and_duplicates(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, method="cwac", seed=1, hs=10.0)
    write_run(a, method="cwac", seed=2, hs=12.0)
    write_run(a, method="cwac", seed=1, hs=40.0, method_params={"lam": 1.0})        # another CWAC config
    write_run(a, method="sft", seed=1, hs=20.0, align_method="vaccine")
    write_run(a, method="lisa", seed=1, hs=25.0, align_method="vaccine")
    write_run(a, method="vaccine", seed=2, hs=21.0, align_method="vaccine")          # the documented pairing
    write_run(b, method="cwac", seed=2, hs=14.0, finished="2026-02-01T00:00:00")      # same cell, newer
    results, cov = load_results([a, b])
    labels = {(r.method, r.seed): r.hs for r in results}
    assert labels == {("cwac", 1): 10.0, ("cwac", 2): 14.0, ("cwac [lam=1.0]", 1): 40.0, ("vaccine", 1): 20.0,
                      ("vaccine", 2): 21.0, ("vaccine+lisa", 1): 25.0}
    assert len(cov.duplicates) == 1 and cov.duplicates[0]["kept"].startswith(str(b))
    t = task_table(results, "main", "t", "c")
    assert [r.labels[1] for r in t.rows] == ["Vaccine+Lisa", "Vaccine", "CWAC", "CWAC [lam=1.0]"]


def test_train_log_keeps_the_last_attempt(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    rows = [{"step": 1, "finetune/losses/task": 9.0}, {"step": 2, "finetune/losses/task": 8.0},
            {"step": 1, "finetune/losses/task": 3.0}, {"step": 2, "finetune/losses/task": 2.0, "finetune/lr": 0.1}]
    (d / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 3, "finetune/lo')
    assert read_train_log(d) == [{"step": 1, "losses/task": 3.0}, {"step": 2, "losses/task": 2.0, "lr": 0.1}]


def test_cli(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, method="sft", seed=1)
    assert main(["--runs", str(root), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    assert "1 complete records -> 1 tables, 0 plots" in capsys.readouterr().out
    assert "python -m cwac.reports.build --runs" in (tmp_path / "out" / "index.md").read_text()
    with pytest.raises(SystemExit):
        main(["--runs", str(tmp_path / "missing")])


def test_variant_labels_are_relative_to_the_method_yaml(tmp_path):
    """The run with the method's documented defaults keeps the plain label even when a variant
    has more records; a key a record lacks (an option added later) is not a difference."""
    from omegaconf import OmegaConf

    from cwac.utils import compose_config

    default = OmegaConf.to_container(compose_config("method=cwac_weight_only").method, resolve=True)
    variant = json.loads(json.dumps(default))
    variant["weight"].update(targets="all", mode="update")
    older = json.loads(json.dumps(default))
    del older["diagnostics"]                                   # a record from before that option existed
    write_run(tmp_path, method="cwac_weight_only", seed=1, hs=80.0, method_params=default)
    write_run(tmp_path, method="cwac_weight_only", seed=2, hs=81.0, method_params=older)
    for seed in (1, 2, 3):
        write_run(tmp_path, method="cwac_weight_only", seed=seed, hs=20.0, method_params=variant)
    labels = {(r.method, r.seed) for r in results_of(tmp_path)}
    assert labels == {("cwac_weight_only", 1), ("cwac_weight_only", 2),
                      *{("cwac_weight_only [weight.mode=update, weight.targets=all]", s) for s in (1, 2, 3)}}
