from typing import List

from kfp.dsl import Dataset, Output


def partition(config: str, overrides: List[str], federation_mode: str, run: Output[Dataset]) -> List[str]:
    """Partition the config's data into sites and build the base model.

    ``run``: the prepared run dir (config.yaml, data/, models/base). Returns the
    settings trained outside the federation: base, site:<name>..., centralized.
    """
    from fedllm.pipeline.steps import partition_step

    return partition_step(config, overrides, run.path, federation_mode)
