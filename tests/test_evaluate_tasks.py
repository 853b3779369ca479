"""The offline HellaSwag, PIQA and WinoGrande tasks: the real release files become the
rows lm-eval's hub datasets hold, malformed rows are named by file and line, and lm-eval
scores the offline tasks exactly as it scores its own task definitions fed the same rows."""

from __future__ import annotations

import bz2
import json
import shutil
from pathlib import Path

import pytest

from fedllm.config import TinyModelSpec
from fedllm.errors import FedllmError
from fedllm.evaluate.tasks import OFFLINE_TASKS, TASK_NAMES, check_task_names, hellaswag, lm_eval_task_dir, piqa, winogrande, write_task_folder

from conftest import SHARED_DATA as DATA  # the checkout's ../shared/data
LIMIT = 20


# ---------------------------------------------------------------- reading the real files


def test_piqa_rows_are_the_release_files_in_the_hub_schema():
    docs = piqa.read_docs(DATA)
    assert len(docs) == 1838
    assert sum(d["label"] for d in docs) == 928  # SOURCES.md: 0: 910, 1: 928
    first = json.loads((DATA / "piqa/valid.jsonl").read_text().splitlines()[0])
    assert docs[0] == {**first, "label": 0}


def test_winogrande_rows_take_their_answer_from_the_labels_file():
    docs = winogrande.read_docs(DATA)
    assert len(docs) == 1267
    assert [d["answer"] for d in docs].count("2") == 639
    assert docs[0] == {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    }


def test_hellaswag_items_become_hub_rows_with_the_context_verbatim():
    docs = hellaswag.read_docs(DATA)
    assert len(docs) == 10042
    assert sorted({d["label"] for d in docs}) == ["0", "1", "2", "3"]
    assert sum(d["label"] == "3" for d in docs) == 2458
    first = docs[0]
    assert first["activity_label"] == "Roof shingle removal"
    assert first["ctx"] == first["ctx_a"] == "A man is sitting on a roof. he"
    assert first["ctx_b"] == ""
    assert first["endings"][3] == "starts pulling up roofing on a roof."
    assert first["label"] == "3"

    # lm-eval's own process_docs makes the query: the file's context, ctx_b not capitalised.
    from lm_eval.tasks.hellaswag.utils import process_docs

    import datasets

    processed = process_docs(datasets.Dataset.from_list(docs[:2]))
    assert processed[0]["query"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert processed[0]["gold"] == 3
    assert processed[1]["query"] == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady"


# ---------------------------------------------------------------- malformed rows


def copy_data(tmp_path: Path, *names: str) -> Path:
    for name in names:
        shutil.copytree(DATA / name, tmp_path / name)
    return tmp_path


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_piqa_bad_json_is_named_by_file_and_line(tmp_path):
    data = copy_data(tmp_path, "piqa")
    replace_line(data / "piqa/valid.jsonl", 3, '{"goal": "x", "sol1": ')
    with pytest.raises(FedllmError, match=r"piqa/valid\.jsonl:3: invalid JSON"):
        piqa.read_docs(data)


def test_piqa_missing_field_is_named_by_file_and_line(tmp_path):
    data = copy_data(tmp_path, "piqa")
    replace_line(data / "piqa/valid.jsonl", 5, '{"goal": "x", "sol1": "y"}')
    with pytest.raises(FedllmError, match=r"piqa/valid\.jsonl:5: missing field 'sol2'"):
        piqa.read_docs(data)


def test_piqa_labels_file_of_another_length_is_rejected(tmp_path):
    data = copy_data(tmp_path, "piqa")
    labels = data / "piqa/valid-labels.lst"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(FedllmError, match=r"valid-labels\.lst: 1837 labels for 1838 questions"):
        piqa.read_docs(data)


def test_winogrande_label_outside_1_2_is_named(tmp_path):
    data = copy_data(tmp_path, "winogrande")
    replace_line(data / "winogrande/dev-labels.lst", 4, "3")
    with pytest.raises(FedllmError, match=r"dev-labels\.lst:4: label '3' is not one of 1, 2"):
        winogrande.read_docs(data)


def test_winogrande_answer_disagreeing_with_labels_file_is_named(tmp_path):
    data = copy_data(tmp_path, "winogrande")
    replace_line(data / "winogrande/dev-labels.lst", 1, "1")  # row 1 says answer "2"
    with pytest.raises(FedllmError, match=r"dev\.jsonl:1: answer '2' disagrees with .*dev-labels\.lst:1"):
        winogrande.read_docs(data)


def write_hellaswag(data: Path, lines: list[str]) -> None:
    (data / "hellaswag").mkdir(parents=True, exist_ok=True)
    with bz2.open(data / hellaswag.ITEMS, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def hellaswag_lines(n_items: int) -> list[str]:
    with bz2.open(DATA / hellaswag.ITEMS, "rt", encoding="utf-8") as f:
        return f.read().splitlines()[: 6 * n_items]


def test_hellaswag_label_outside_0_3_is_named_by_line(tmp_path):
    lines = hellaswag_lines(3)
    lines[6 + 1] = "4"  # item 1's label line is line 8 of the file
    write_hellaswag(tmp_path, lines)
    with pytest.raises(FedllmError, match=r"hellaswag_val_full\.txt\.bz2:8: item 1 label '4' is not one of 0, 1, 2, 3"):
        hellaswag.read_docs(tmp_path)


def test_hellaswag_truncated_item_is_rejected(tmp_path):
    write_hellaswag(tmp_path, hellaswag_lines(3)[:-1])
    with pytest.raises(FedllmError, match=r"hellaswag_val_full\.txt\.bz2: 17 lines is not a multiple of 6"):
        hellaswag.read_docs(tmp_path)


def test_hellaswag_file_that_is_not_bz2_is_rejected(tmp_path):
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / hellaswag.ITEMS).write_text("Roof shingle removal: A man\n3\n")
    with pytest.raises(FedllmError, match=r"hellaswag_val_full\.txt\.bz2: not a readable bz2 file"):
        hellaswag.read_docs(tmp_path)


def test_missing_task_file_and_unknown_task_are_named(tmp_path):
    with pytest.raises(FedllmError, match=r"piqa/valid\.jsonl: task data file not found"):
        piqa.read_docs(tmp_path)
    with pytest.raises(FedllmError, match=r"unknown evaluation task 'arc_easy'; choose from hellaswag, piqa, winogrande"):
        check_task_names(["piqa", "arc_easy"])


def test_task_folder_includes_lm_evals_own_yaml(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = write_task_folder(DATA, tmp_path / "tasks", first_docs=7)
    assert sorted(p.name for p in folder.iterdir()) == ["hellaswag.yaml", "piqa.yaml", "winogrande.yaml"]
    for name in TASK_NAMES:
        ours = load_yaml(folder / f"{name}.yaml", resolve_func=False)
        stock = load_yaml(lm_eval_task_dir() / OFFLINE_TASKS[name][0], resolve_func=False)
        changed = {key for key in ours if ours.get(key) != stock.get(key)}
        # Only where the rows come from differs; prompts, choices, targets, metrics are lm-eval's.
        assert changed <= {"dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split", "test_split"}, name
        assert ours["doc_to_text"] == stock["doc_to_text"] and ours["metric_list"] == stock["metric_list"]
        assert ours["dataset_kwargs"] == {"data_dir": str(DATA.resolve()), "first_docs": 7}


# ---------------------------------------------------------------- fidelity to lm-eval's own tasks


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fedllm.train.model import build_tiny_model

    texts = [f"{d['goal']} {d['sol1']} {d['sol2']}" for d in piqa.read_docs(DATA)[:600]]
    texts += [d["sentence"] for d in winogrande.read_docs(DATA)[:600]]
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1024)
    return build_tiny_model(spec, texts, tmp_path_factory.mktemp("tiny-model"))


def stock_task_fed(name: str, docs: list[dict]):
    """lm-eval's own task ``name`` (its YAML, loaded by lm-eval), its dataset replaced by ``docs``.

    ``download`` is the hook lm-eval calls to fill ``task.dataset``; the stock one would
    fetch the hub dataset, this one hands over the given rows as train and validation.
    """
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    class StockTaskOnRows(ConfigurableTask):
        def download(self, dataset_kwargs=None, **kwargs):
            rows = datasets.Dataset.from_list(docs)
            self.dataset = datasets.DatasetDict({"train": rows, "validation": rows})

    config = load_yaml(lm_eval_task_dir() / OFFLINE_TASKS[name][0], resolve_func=True)
    return StockTaskOnRows(config=config)


def test_offline_tasks_score_exactly_like_lm_evals_tasks_on_the_same_rows(tiny_model, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    readers = {"hellaswag": hellaswag, "piqa": piqa, "winogrande": winogrande}
    lm = HFLM(pretrained=str(tiny_model), device="cpu", batch_size=8)

    folder = write_task_folder(DATA, tmp_path / "tasks", first_docs=LIMIT)
    offline = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(TASK_NAMES),
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        limit=LIMIT,
        log_samples=True,
    )
    # The stock tasks get more rows than are scored: lm-eval's limit picks the first ones.
    stock_tasks = [stock_task_fed(name, readers[name].read_docs(DATA)[: 2 * LIMIT]) for name in TASK_NAMES]
    stock = lm_eval.simple_evaluate(
        model=lm,
        tasks=stock_tasks,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        limit=LIMIT,
        log_samples=True,
    )

    for name in TASK_NAMES:
        ours, theirs = offline["samples"][name], stock["samples"][name]
        assert len(ours) == len(theirs) == LIMIT
        n_choices = {"hellaswag": 4, "piqa": 2, "winogrande": 2}[name]
        for a, b in zip(ours, theirs):
            assert a["doc_id"] == b["doc_id"]
            assert a["doc"] == b["doc"]
            assert a["arguments"] == b["arguments"]  # the same (context, continuation) pairs
            assert len(a["resps"]) == n_choices
            assert a["resps"] == b["resps"] and a["filtered_resps"] == b["filtered_resps"]
            assert a["target"] == b["target"]
        assert offline["results"][name] == stock["results"][name]

    # Winogrande puts each option into the context and scores the rest of the sentence.
    first = offline["samples"]["winogrande"][0]["arguments"]
    assert first[0] == ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases.")
    assert first[1][0].endswith("so Maria")
    # PIQA's prompt is lm-eval's "Question: ...\nAnswer:".
    assert offline["samples"]["piqa"][0]["arguments"][0][0].startswith("Question: How do I ready a guinea pig cage")
