"""The operator surface: HTTP endpoints, Prometheus metrics, logs and the terminal console."""
