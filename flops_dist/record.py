"""One step's record: the schema of the run log, the source of the Prometheus metrics and of the
progress line. Adding a field here adds it everywhere."""
from __future__ import annotations

from dataclasses import dataclass, fields

# the flops allocator's λ, as reported. β0 is fixed (LambdaState says why), so lambda_beta0 is a
# constant column: kept, so the run log's schema and the code that reads it stay as they were.
LAMBDA_NAMES = ("beta0", "beta1", "s", "gamma")


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float                 # mean clean loss of the batch's usable examples
    queries: int
    dropped_queries: int        # queries whose loss (or baseline) was NaN or inf: left out of the estimate
    dropped_examples: int       # examples with a non-finite clean loss or embedding: kept from the allocator
    allocation_min: int         # units per example (pairs for the antithetic estimator)
    allocation_mean: float
    allocation_max: int
    allocation_gini: float
    variance_proxy: float       # V̂(A)/B'²: Σ ĉ_j/A_j, plus the cross term under shared pairing (allocators.py)
    lambda_beta0: float         # NaN for allocators without λ; fixed (the mean's scale) for flops
    lambda_beta1: float
    lambda_s: float
    lambda_gamma: float
    update_bytes: int
    seconds: float
    theta_hash: str = ""        # θ after this step's update, where the replicas were compared
    test_metric: float = float("nan")  # held-out data.metric at θ after this step's update, where scored


def record_columns() -> list[tuple[str, type]]:
    """(name, Python type) of every field, in order: what the run log's schema is made from."""
    kinds = {"int": int, "float": float, "str": str}
    return [(f.name, kinds[f.type]) for f in fields(StepRecord)]
