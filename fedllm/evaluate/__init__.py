"""Zero-shot benchmarks of a model with lm-eval: HellaSwag, PIQA, WinoGrande.

``evaluate_model`` is the one entry point (``fedllm evaluate`` calls it); the tasks are
lm-eval's own, reading their rows from local files (``fedllm.evaluate.tasks``) so
air-gapped sites need no hub.
"""

from fedllm.evaluate.run import batch_size_from_text, evaluate_model
from fedllm.evaluate.tasks import TASK_NAMES

__all__ = ["TASK_NAMES", "batch_size_from_text", "evaluate_model"]
