"""anomaly-bench: a config-driven runner for industrial visual anomaly detection experiments."""

__version__ = "0.1.0"
