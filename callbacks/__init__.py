"""Callbacks and plugins that keep long runs fast and safe; each works with every LightningModule here."""

from callbacks.checkpoint_io import AsyncAtomicCheckpointIO, AtomicCheckpointIO, CorruptCheckpointError
from callbacks.matmul_precision import Float32MatmulPrecision
from callbacks.nan_skip import NonFiniteStepError, SkipNonFiniteSteps
from callbacks.profiler import StepWindowProfiler
from callbacks.resume import ExactResume
from callbacks.throughput import PEAK_FLOPS, TokenThroughputMonitor

__all__ = [
    "AsyncAtomicCheckpointIO",
    "AtomicCheckpointIO",
    "CorruptCheckpointError",
    "ExactResume",
    "Float32MatmulPrecision",
    "NonFiniteStepError",
    "PEAK_FLOPS",
    "SkipNonFiniteSteps",
    "StepWindowProfiler",
    "TokenThroughputMonitor",
]
