"""The console of main_npd: the process's own and its children's output goes to the run's log, the
console gets a progress bar, a line per validation and whatever is written to it on purpose."""

import io
import subprocess
import sys
import textwrap

from verl_npd.trainer.console import LiveProgress, format_validation


def test_output_of_the_process_and_its_children_goes_to_the_log(tmp_path):
    log = tmp_path / "out" / "run.log"
    code = f"""
        import os, subprocess, sys
        from verl_npd.trainer.console import output_to_log
        print("before")
        with output_to_log({str(log)!r}) as console:
            print("driver line")
            print("driver warning", file=sys.stderr)
            subprocess.run(["echo", "child line"])
            print("for the user", file=console)
        print("after")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["before", "for", "the", "user", "after"]
    assert result.stderr == ""
    assert log.read_text().split("\n")[:3] == ["driver line", "driver warning", "child line"]


def test_the_bar_shows_the_figures_and_one_line_per_validation():
    console = io.StringIO()
    progress = LiveProgress(runner=None, console=console)
    progress.show({"step": 0, "total": 4, "validations": [(0, 0.25)], "accuracy": 0.25})
    progress.show(
        {
            "step": 2,
            "total": 4,
            "validations": [(0, 0.25)],
            "accuracy": 0.25,
            "staleness": 1.0,
            "kept": 0.875,
            "tokens_per_s": 1234.4,
        }
    )
    progress.show(
        {
            "step": 4,
            "total": 4,
            "validations": [(0, 0.25), (4, 0.5)],
            "accuracy": 0.5,
            "staleness": 2.0,
            "kept": 0.9,
            "tokens_per_s": 1500.0,
        }
    )
    progress._bar.close()
    text = console.getvalue()
    assert text.count(format_validation(0, 0.25)) == 1 and text.count(format_validation(4, 0.5)) == 1
    assert "4/4" in text and "acc=50.0%" in text and "kept=90.0%" in text and "tok/s=1500" in text
    assert format_validation(4, 0.5) == "validation at step 4: accuracy 50.0%"


def test_a_validation_that_ended_the_run_between_two_polls_is_still_shown():
    progress = LiveProgress(runner=None, console=io.StringIO())
    progress.show({"step": 3, "total": 4, "validations": [(0, 0.25)], "accuracy": 0.25})
    progress._bar.close()
    summary_validations = [{"step": 0, "accuracy": 0.25}, {"step": 4, "accuracy": 0.5}]
    assert progress.missed_validations(summary_validations) == ["validation at step 4: accuracy 50.0%"]
