"""benchmarks/RESULTS.md is generated: it must be what ``python -m benchmarks report`` makes of the
committed JSON, its templates must type in no figure, and every benchmark script belongs to a suite."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.suites import SUITES  # noqa: E402

#: Jinja tags and comments: what the templates compute, not prose.
_TAGS = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
#: A number standing alone in prose (not part of a name such as fp32, SmolLM2-135M or Llama-3-8B).
_NUMBER = re.compile(r"(?<![\w.\-/=])\d+(?:[.,]\d+)*(?![\w\-])")


def test_results_md_is_what_the_generator_makes_of_the_committed_json():
    expected = report.render()
    assert report.OUTPUT.read_text() == expected, (
        "benchmarks/RESULTS.md differs from what the generator makes of benchmarks/results/*.json: "
        "run `python -m benchmarks report` and commit the result (never edit RESULTS.md by hand)")


@pytest.mark.parametrize("section", report.SECTIONS)
def test_templates_type_in_no_figure(section):
    prose = _TAGS.sub(" ", (report.TEMPLATES / f"{section}.md").read_text())
    typed = [m.group(0) for m in _NUMBER.finditer(prose)]
    assert not typed, f"templates/{section}.md types in {typed}: take them from the JSON (or report.TARGETS)"


def test_the_plots_results_md_shows_exist():
    shown = re.findall(r"\]\((plots/[^)]+\.png)\)", report.OUTPUT.read_text())
    assert shown, "RESULTS.md shows no plot"
    missing = [p for p in shown if not (report.HERE / p).is_file()]
    assert not missing, f"RESULTS.md shows {missing}, which are not committed: run `python -m benchmarks report`"


def test_every_benchmark_script_is_in_a_suite():
    in_suites = {b.script for benches in SUITES.values() for b in benches}
    scripts = {p.name for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert scripts == in_suites, f"not in a suite: {sorted(scripts - in_suites)}; no such script: {sorted(in_suites - scripts)}"


def test_every_committed_result_records_how_it_was_made():
    for name, result in report.load_results().items():
        run, machine = result["run"], result["machine"]
        assert run["command"] and "date" in run, f"{name}.json: no command or date"
        assert {"device", "cpu_count", "torch", "torch_threads"} <= set(machine), f"{name}.json: machine incomplete"
        if "transcribed" not in result:
            assert run["date"] and "load_average_start" in machine, f"{name}.json: no date or load average"
