"""profile -> plan -> simulate: how many prompt and token services a workload needs.

Pure Python over a JSON profile (no torch, no services), so every answer is fast and testable:

- `profile.py`   what one machine measured for one model (`dejavu profile` writes it, with the real
                 engine, in bench/profile.py) and the interpolation between the measured points;
- `plan.py`      the split of D machines by the DéjàVu paper's formula and memory minimums, or the
                 fewest services that meet a TTFT and a TPOT target at an arrival rate;
- `workload.py`  the requests to replay: bench.load's Poisson arrivals and chat-like lengths, or a trace;
- `simulate.py`  an event-driven replay of those requests through a layout of services;
- `validate.py`  the simulator's predictions against what bench.load measured;
- `plot.py`      latency against rate for several layouts (matplotlib, only when installed).
"""
