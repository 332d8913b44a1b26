"""The run report: one self-contained HTML page (`tunelab report`; refreshed by the trainer at checkpoints)."""

from tunelab.report.build import write_report

__all__ = ["write_report"]
