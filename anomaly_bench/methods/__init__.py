"""Anomaly detection methods behind one interface (see :mod:`anomaly_bench.methods.base`)."""

from anomaly_bench.methods.base import (
    LEARNING,
    AnomalyMethod,
    MethodContext,
    available,
    build_method,
    keys_at_test,
    learning_of,
    load_fitted_state,
    method_defaults,
    method_schema,
)

__all__ = [
    "LEARNING",
    "AnomalyMethod",
    "MethodContext",
    "available",
    "build_method",
    "keys_at_test",
    "learning_of",
    "load_fitted_state",
    "method_defaults",
    "method_schema",
]
