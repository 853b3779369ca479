"""The data layer: sources -> examples -> sites -> train/val/test files.

    from fedllm.data import prepare_partitions, load_partitions, format_example
    parts = prepare_partitions(cfg, "runs/demo/data")
    prompt, response = format_example(parts.train("site-1")[0], cfg.data.template)
"""

from fedllm.data.formats import FORMATS, RecordFormat, get_format, read_format
from fedllm.data.jsonl import read_jsonl, write_jsonl
from fedllm.data.partition import PARTITIONERS, label_of, partition_examples
from fedllm.data.prepare import Partitions, load_partitions, prepare_partitions
from fedllm.data.prompts import TEMPLATES, PromptTemplate, format_example, get_template
from fedllm.data.records import Example
from fedllm.data.sources import load_source
from fedllm.data.splits import SPLITS, split_examples
from fedllm.data.summary import partition_summary, write_summary

__all__ = [
    "Example",
    "FORMATS",
    "PARTITIONERS",
    "Partitions",
    "PromptTemplate",
    "RecordFormat",
    "SPLITS",
    "TEMPLATES",
    "format_example",
    "get_format",
    "get_template",
    "label_of",
    "load_partitions",
    "load_source",
    "partition_examples",
    "partition_summary",
    "prepare_partitions",
    "read_format",
    "read_jsonl",
    "split_examples",
    "write_jsonl",
    "write_summary",
]
