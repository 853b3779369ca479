"""The fine-tuning task's own metric: which label does the model choose?

For a classification-like task (Financial PhraseBank's negative / neutral / positive),
each row's prompt is followed by every candidate answer, and the model's choice is the
candidate with the highest summed log-likelihood of its tokens after the prompt (the
rule lm-eval's multiple-choice ``acc`` uses). Reported as accuracy and macro-F1 over the
candidates; the per-row choices are kept, so two settings can be compared on the very
same rows (fedllm.evaluate.bootstrap).

    scorer = LabelChoiceScorer(tokenizer, rows, template="phrasebank", choices=["negative", "neutral", "positive"])
    result = scorer.score(model)   # {"accuracy": 0.88, "macro_f1": 0.86, "predicted": [...], ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from fedllm.data.prompts import format_example, get_template
from fedllm.data.records import Example
from fedllm.errors import FedllmError
from fedllm.train.module import decoder_and_head


def accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """Fraction of rows whose predicted index equals the gold one."""
    if len(gold) != len(predicted) or not gold:
        raise FedllmError(f"accuracy: {len(gold)} gold labels and {len(predicted)} predictions; need equal, > 0")
    return sum(int(g == p) for g, p in zip(gold, predicted)) / len(gold)


def macro_f1(gold: Sequence[int], predicted: Sequence[int], num_classes: int) -> float:
    """Unweighted mean over the ``num_classes`` classes of each class's F1.

    A class that is neither in ``gold`` nor predicted counts as F1 = 0 only if it
    appears somewhere; classes absent from both are left out of the mean (as
    scikit-learn does with ``labels`` restricted to the present ones).
    """
    if len(gold) != len(predicted) or not gold:
        raise FedllmError(f"macro_f1: {len(gold)} gold labels and {len(predicted)} predictions; need equal, > 0")
    scores = []
    for c in range(num_classes):
        tp = sum(1 for g, p in zip(gold, predicted) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, predicted) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, predicted) if g == c and p != c)
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def task_rows(partitions, split: str) -> list[Example]:
    """The rows the task metric is scored on: every site's ``split`` pooled, in site
    order. Heterogeneous sites' test splits pooled have the label mix of the whole
    data set, so no site's skew is rewarded."""
    reader = {"test": partitions.test, "val": partitions.val}[split]
    return [row for site in partitions.sites for row in reader(site)]


def default_choices(train_rows: Sequence[Example]) -> list[str]:
    """The distinct answers of the training rows, sorted: the candidate labels."""
    return sorted({row.output for row in train_rows})


class LabelChoiceScorer:
    """Scores a causal LM on ``rows`` by the label it finds most likely.

    The rows are tokenized once, as training tokenizes them: the prompt and each
    candidate answer separately (``template`` formats both), so the scored tokens are
    exactly the tokens the model was trained to produce. Rows whose answer is not one
    of ``choices`` are an error naming the row's origin (file:line).
    """

    def __init__(self, tokenizer, rows: Sequence[Example], template: str, choices: Sequence[str],
                 max_length: int = 256, batch_size: int = 32):
        if len(set(choices)) < 2:
            raise FedllmError(f"task metric label_choice: needs at least two distinct choices, got {list(choices)}")
        self.choices = list(choices)
        self.batch_size = batch_size
        self.origins = [row.origin for row in rows]
        index = {choice: i for i, choice in enumerate(self.choices)}
        self.gold = []
        for row in rows:
            if row.output not in index:
                raise FedllmError(
                    f"{row.origin or 'a task row'}: answer {row.output!r} is not one of the choices {self.choices}"
                )
            self.gold.append(index[row.output])
        if not rows:
            raise FedllmError("task metric label_choice: no rows to score")
        t = get_template(template)
        self.choice_ids = [
            tokenizer(t.response.format(instruction="", input="", output=c), add_special_tokens=False)["input_ids"]
            for c in self.choices
        ]
        # The prompt keeps its end (where the answer follows) when it is too long.
        room = max_length - max(len(ids) for ids in self.choice_ids)
        self.prompt_ids = [tokenizer(format_example(row, t)[0], add_special_tokens=False)["input_ids"][-room:] for row in rows]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # One forward per row when every choice is one token: its log-probability is
        # read at the prompt's last position. Otherwise one forward per (row, choice).
        self.single_token = all(len(ids) == 1 for ids in self.choice_ids)

    def score(self, model, autocast_dtype=None) -> dict:
        """``{"accuracy", "macro_f1", "n", "choices", "gold", "predicted"}`` for ``model``
        (an HF causal LM or a peft model), in eval mode and without gradients; the
        model's train/eval mode is restored afterwards."""
        import torch

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                                 enabled=autocast_dtype is not None):
                scores = self._choice_scores(model, device)
        finally:
            model.train(was_training)
        predicted = [max(range(len(self.choices)), key=lambda c: row[c]) for row in scores]
        return {
            "accuracy": accuracy(self.gold, predicted),
            "macro_f1": macro_f1(self.gold, predicted, len(self.choices)),
            "n": len(self.gold),
            "choices": self.choices,
            "gold": list(self.gold),
            "predicted": predicted,
            "origins": list(self.origins),
        }

    def _choice_scores(self, model, device) -> list[list[float]]:
        if self.single_token:
            targets = [ids[0] for ids in self.choice_ids]
            scores = []
            for logprobs in self._last_logprobs(model, device, self.prompt_ids):
                scores.append([float(logprobs[t]) for t in targets])
            return scores
        sequences, spans = [], []
        for prompt in self.prompt_ids:
            for ids in self.choice_ids:
                sequences.append(prompt + ids)
                spans.append((len(prompt), ids))
        flat = self._continuation_logprobs(model, device, sequences, spans)
        k = len(self.choices)
        return [flat[i * k:(i + 1) * k] for i in range(len(self.prompt_ids))]

    def _batches(self, sequences):
        # Similar lengths together: little compute goes to padding.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def _hidden(self, model, device, batch: list[list[int]]):
        """Right-padded ``batch`` through ``model``: ``(hidden or log-probs, head)``.

        Where the model allows it (fedllm.train.module.decoder_and_head) only the decoder
        runs here and the caller projects just the positions it scores: ``head`` is the
        output layer. Otherwise the model runs whole and ``head`` is None (log-probs of
        the real positions).
        """
        import torch

        width = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            input_ids[i, :len(s)] = torch.tensor(s)
            attention[i, :len(s)] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        split = decoder_and_head(model)
        if split is None:
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            return logits[:, -width:].float().log_softmax(-1), None
        decoder, head = split
        return decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state, head

    @staticmethod
    def _logprobs_at(hidden, head, rows, positions):
        """Log-probabilities over the vocabulary at ``(row, position)`` pairs."""
        picked = hidden[rows, positions]
        return picked.float().log_softmax(-1) if head is None else head(picked).float().log_softmax(-1)

    def _last_logprobs(self, model, device, prompts):
        out = [None] * len(prompts)
        for idx in self._batches(prompts):
            hidden, head = self._hidden(model, device, [prompts[i] for i in idx])
            logprobs = self._logprobs_at(hidden, head, list(range(len(idx))), [len(prompts[i]) - 1 for i in idx])
            for row, i in enumerate(idx):
                out[i] = logprobs[row].cpu()
        return out

    def _continuation_logprobs(self, model, device, sequences, spans):
        out = [0.0] * len(sequences)
        for idx in self._batches(sequences):
            hidden, head = self._hidden(model, device, [sequences[i] for i in idx])
            rows, positions, targets, owner = [], [], [], []
            for row, i in enumerate(idx):
                start, ids = spans[i]
                for j, t in enumerate(ids):
                    rows.append(row)
                    positions.append(start - 1 + j)
                    targets.append(t)
                    owner.append(i)
            logprobs = self._logprobs_at(hidden, head, rows, positions)
            for k, (i, t) in enumerate(zip(owner, targets)):
                out[i] += float(logprobs[k, t])
        return out


def make_scorer(cfg, partitions, tokenizer) -> Optional[LabelChoiceScorer]:
    """The run's task scorer, or None when the config asks for no task metric."""
    task = cfg.evaluation.task
    if task.metric is None:
        return None
    pooled_train = partitions.pooled_train()
    choices = task.choices or default_choices(pooled_train)
    if len(choices) > 20:
        raise FedllmError(
            f"config field 'evaluation.task.choices': the training data has {len(choices)} distinct answers; "
            "label_choice is for a handful of labels (give evaluation.task.choices, or metric: null)"
        )
    return LabelChoiceScorer(tokenizer, task_rows(partitions, task.split), cfg.data.template, choices,
                             max_length=cfg.training.max_seq_length, batch_size=task.batch_size)


def task_file(run_dir, setting: str):
    """Where a setting's per-row choices are kept: ``tasks/<setting>.json`` in the run dir."""
    from fedllm.rundir import RunDir

    return RunDir(run_dir).task_file(setting)


def record_task(cfg, run_dir, setting: str, curve: list[dict], final: dict) -> dict:
    """Write the setting's per-row choices to :func:`task_file` and return its ``task``
    entry for summary.json: metric, split, choices, rows, final accuracy and macro-F1,
    the per-round ``curve`` and the predictions file (relative to the run dir)."""
    from fedllm.files import write_json_atomic

    path = task_file(run_dir, setting)
    write_json_atomic(path, {"setting": setting, "choices": final["choices"], "gold": final["gold"],
                             "predicted": final["predicted"], "origins": final["origins"]})
    return {
        "metric": cfg.evaluation.task.metric,
        "split": cfg.evaluation.task.split,
        "choices": final["choices"],
        "n": final["n"],
        "accuracy": final["accuracy"],
        "macro_f1": final["macro_f1"],
        "curve": curve,
        "predictions": str(path.relative_to(Path(run_dir).resolve())),
    }
