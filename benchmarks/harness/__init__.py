"""benchmarks/compare.py's parts: the workloads and runner table (specs.py), preparation
of models and inputs (prepare.py), worker processes (workers.py), the round-robin
schedule (schedule.py), the machine's compute ceiling (machine.py) and the reports
(report.py). The runner processes' own side is benchmarks/peers/worker.py."""
