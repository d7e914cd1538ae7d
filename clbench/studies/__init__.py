"""Studies over finished runs, read through clbench.records: the matched-budget study (budget),
baselines' settings chosen on the eval split (selection), and the overlap of a run's importance maps
(importance). `clbench analyze budget | select | importance` runs them (clbench/analyze.py)."""
