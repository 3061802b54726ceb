"""Anomaly detection methods behind one interface (see :mod:`anomaly_bench.methods.base`)."""

from anomaly_bench.methods.base import (
    LEARNING,
    NEUTRAL_BACKBONE_KEYS,
    AnomalyMethod,
    MethodContext,
    available,
    backbone_roles,
    build_method,
    comparable,
    keys_at_test,
    learning_of,
    load_fitted_state,
    method_defaults,
    method_schema,
    requested_weights,
)

__all__ = [
    "LEARNING",
    "NEUTRAL_BACKBONE_KEYS",
    "AnomalyMethod",
    "MethodContext",
    "available",
    "backbone_roles",
    "build_method",
    "comparable",
    "keys_at_test",
    "learning_of",
    "load_fitted_state",
    "method_defaults",
    "method_schema",
    "requested_weights",
]
