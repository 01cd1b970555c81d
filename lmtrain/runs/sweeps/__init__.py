"""Sweeps you can read: each job's status.json, the sweep's summary table and plots, `lmtrain summarize|plot`."""
