"""tiercache's benchmarks: scripts grouped into suites (``suites.py``), one runner
(``python -m benchmarks SUITE [--quick]``, ``runner.py``), and the report that writes
``RESULTS.md`` and the plots from the JSON the scripts write (``python -m benchmarks report``,
``report.py``, ``plots.py``, ``templates/``).

Each ``bench_*.py`` still runs on its own as a script (``python benchmarks/bench_x.py``): it
imports its helpers (``common.py``) from its own folder.
"""
