"""The field's real event file (../shared/fixtures, beside the project root), shared by the
event-reader and loss tests; tests that need it skip when the folder is absent."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
KOHYA = sorted((FIXTURES / "kohya-tensorboard").glob("*/finetuning/events.out.tfevents.*"))
