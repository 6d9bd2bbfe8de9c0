"""Execution graph: the operators of one step with FLOPs and bytes, from a model shape and a batch.

Standard library only, so cost models and reports can use it without torch.
"""

from sagellm.graph.batch import BatchShape
from sagellm.graph.operators import DTYPE_BYTES, Operator, dtype_bytes, step_operators, step_totals

__all__ = ["DTYPE_BYTES", "BatchShape", "Operator", "dtype_bytes", "step_operators", "step_totals"]
