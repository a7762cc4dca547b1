"""The bench: every headline figure of hub beside a ceiling measured in the same run
(`python -m loadtest.bench`; the docstring of __main__.py says what it measures).

- `__main__.py`: the command (flags, the run, the order of the sections);
- `plan.py`: how big each measurement is (`Plan`, `QUICK`), the sections and their targets;
- `base.py`: what the sections share (the run's Redis, fresh hubs, workers, raw ceiling
  servers, failed halves as row errors, best-of runs);
- one module per section: `fanout.py`, `latency.py`, `bulk.py`, `importing.py` (the import
  section), `getuser.py`, `idle.py`, `access_log.py` and `cluster.py` (run only by --only);
  `streams.py` holds the client-stream runs and the pipelined-Redis ceiling that bulk and
  import share;
- `report.py`: rows, the Markdown table, bench.json and latency.png;
- `procs.py`: Redis, hubs, worker processes, CPU and memory meters (also used by
  `loadtest.fanout` and `loadtest.bulk_import`);
- `clients.py`: the client worker processes (`python -m loadtest.bench.clients`).
"""
