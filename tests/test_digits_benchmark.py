"""The digits benchmark end to end in its --quick setting: data, teacher, three distillations, evaluation."""

import json
import math
import os
import re

from conftest import run_script, run_scripts


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


def test_evaluate_names_a_missing_model_or_a_checkpoint_in_one_line(tiny_teacher, tmp_path):
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "training_state.json").write_text("{}")
    for teacher, student, expected in [(tmp_path / "missing", tmp_path, "error: cannot load the teacher from"),
                                       (tiny_teacher, checkpoint, "is a training checkpoint, not a pipeline")]:
        result = run_script("scripts/evaluate.py", "--teacher", str(teacher), "--student", f"SPLAM={student}",
                            "--w_scale", "3", "--seeds", "0", "--steps", "1", "--out", str(tmp_path / "results.json"))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert expected in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]


def test_evaluate_refuses_student_names_that_clash(tmp_path):
    """A student named teacher stopped with a KeyError after the teacher's sampling; two of one name
    kept only the last."""
    cases = [(["teacher=a"], "'teacher'"), (["SPLAM=a", "SPLAM=b"], "'SPLAM'"), (["=a"], "''")]
    results = run_scripts(*[["scripts/evaluate.py", "--teacher", str(tmp_path), *[f"--student={item}" for item in students],
                             "--w_scale", "3", "--out", str(tmp_path / "results.json")] for students, _ in cases])
    for result, (_, expected) in zip(results, cases):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"--student names must be unique, not empty and not 'teacher' (the teacher's row), got {expected}" in \
            result.stderr.strip().splitlines()[-1]
