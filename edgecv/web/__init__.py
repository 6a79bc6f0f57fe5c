"""The operator HTTP server (``http:`` in the config, off by default): Prometheus metrics, health and readiness
checks, and a live annotated preview of every camera. Standard-library HTTP on its own daemon thread; it reads
the pipeline's counters and newest frames when asked, so the pipeline's threads pay (almost) nothing for it."""
