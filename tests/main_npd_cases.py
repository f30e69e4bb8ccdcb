"""``python tests/main_npd_cases.py CASES_JSON RESULTS_JSON``: main_npd's command line once per case
(a list of arguments), all in this one process, so that many configs that must fail before Ray
pay the imports (about 5 s) once instead of once each. Writes, per case, its exit code, what it
printed, its seconds and whether Ray was started."""

import contextlib
import io
import json
import sys
import time
import traceback

import ray

from verl_npd import main_npd


def run_case(args: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.monotonic()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        sys.argv = ["main_npd", *args]
        try:
            main_npd.cli()
        except SystemExit as e:
            code = e.code
        except Exception:
            traceback.print_exc()
            code = "exception"
    return {
        "returncode": code,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "seconds": time.monotonic() - start,
        "ray_started": ray.is_initialized(),
    }


if __name__ == "__main__":
    cases_path, results_path = sys.argv[1:]  # read first: each case sets sys.argv as main_npd's
    with open(cases_path) as f:
        cases = json.load(f)
    results = [run_case(args) for args in cases]
    with open(results_path, "w") as f:
        json.dump(results, f)
