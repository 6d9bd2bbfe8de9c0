"""Serving metrics shared by the simulator and the live engine: per-request records and run summaries."""

from sagellm.metrics.records import RECORD_COLUMNS, MetricsCollector, RequestRecord
from sagellm.metrics.summary import SLO, handoff_summary, summarize

__all__ = ["RECORD_COLUMNS", "SLO", "MetricsCollector", "RequestRecord", "handoff_summary", "summarize"]
