"""Prompt templates: an Example -> (prompt, response).

The model sees ``prompt + response``; with answer-only loss (the default) only
the response's tokens are scored. One registry, ``TEMPLATES``; the config picks
one by name (``data.template``).

    prompt, response = format_example(example, "alpaca")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedllm.data.records import Example
from fedllm.errors import FedllmError


@dataclass(frozen=True)
class PromptTemplate:
    """``prompt`` is used when the example has an input (context), and
    ``prompt_no_input`` (when given) when it has none. Placeholders:
    ``{instruction}``, ``{input}``, ``{output}``; ``response`` is formatted the
    same way and is the part the loss covers."""

    name: str
    prompt: str
    prompt_no_input: Optional[str] = None
    response: str = "{output}"


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        # Stanford Alpaca's prompt, as used for Dolly and medical instruction data
        PromptTemplate(
            "alpaca",
            prompt=(
                "Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
            ),
            prompt_no_input=(
                "Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
            ),
        ),
        PromptTemplate("plain", prompt="{instruction}\n{input}\n", prompt_no_input="{instruction}\n"),
        # the seed's Financial PhraseBank prompt: "{sentence} sentiment: {label}"
        PromptTemplate("phrasebank", prompt="{instruction} sentiment:", response=" {output}"),
    )
}


def get_template(name: str, where: str = "data.template") -> PromptTemplate:
    """The registered template ``name``; an error naming ``where`` and the allowed values otherwise."""
    if name not in TEMPLATES:
        raise FedllmError(f"config field '{where}': unknown template {name!r}; allowed values: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def format_example(example: Example, template: str | PromptTemplate) -> tuple[str, str]:
    """``(prompt, response)`` for ``example``; ``prompt + response`` is the full text."""
    t = get_template(template) if isinstance(template, str) else template
    values = {"instruction": example.instruction, "input": example.input, "output": example.output}
    # str.format does not re-read substituted text, so braces in the data are safe
    pattern = t.prompt if example.input.strip() or t.prompt_no_input is None else t.prompt_no_input
    return pattern.format(**values), t.response.format(**values)
