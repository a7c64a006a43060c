"""The digits benchmark end to end in its --quick setting: data, teacher, three distillations, evaluation."""

import json
import math
import os
import re

from conftest import run_script


def test_the_quick_benchmark_writes_table_plot_and_grids(tmp_path):
    work_dir = str(tmp_path / "digits")
    result = run_script("scripts/run_digits_benchmark.py", "--quick", "--work_dir", work_dir, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("digits.md", "digits.png", "results.json", "samples-teacher.png", "samples-splam.png", "samples-lcm.png",
                 "samples-splam-zero.png"):
        assert os.path.getsize(os.path.join(work_dir, name)) > 0, name
    results = json.load(open(os.path.join(work_dir, "results.json")))
    assert set(results["methods"]) == {"teacher", "SPLAM", "LCM", "SPLAM-zero"}
    assert set(results["methods"]["SPLAM"]) == set(results["methods"]["LCM"]) == set(results["methods"]["SPLAM-zero"]) == {"1", "2", "4"}
    assert results["judge_heldout_accuracy"] > 0.9
    for method, by_steps in results["methods"].items():
        for stats in by_steps.values():
            assert len(stats["accuracy"]["per_seed"]) == 2
            assert all(math.isfinite(value) for entry in stats.values() for value in entry["per_seed"])
    for steps in ("1", "2", "4"):
        assert results["methods"]["SPLAM"][steps]["latent_mse"]["mean"] > 0
    table = open(os.path.join(work_dir, "digits.md")).read()
    assert len(re.findall(r"^\| (SPLAM|LCM|SPLAM-zero) \| [124] \|", table, re.M)) == 9
    assert "python scripts/run_digits_benchmark.py --quick" in table
