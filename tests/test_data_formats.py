"""Record formats: the real public data sets load with their documented counts, and
bad files fail with the file and line."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from fedllm.data.formats import FORMATS, read_format
from fedllm.errors import FedllmError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"public data not at {DATA}")


@needs_data
def test_financial_phrasebank_all_agree_counts():
    path = DATA / "financial_phrasebank" / "Sentences_AllAgree.txt"
    examples = FORMATS["financial_phrasebank"].read(path)
    assert len(examples) == 2264
    assert Counter(ex.label for ex in examples) == {"negative": 303, "neutral": 1391, "positive": 570}
    first = examples[0]
    assert first.instruction.startswith("According to Gran , the company has no plans")
    assert first.output == first.label == "neutral"
    assert first.origin == f"{path}:1" and first.source == ""
    # the Latin-1 text is decoded, not mangled (the file has no valid UTF-8 for these)
    assert any("é" in ex.instruction or "ä" in ex.instruction for ex in examples)


@needs_data
def test_financial_phrasebank_50_agree_counts():
    examples = read_format("financial_phrasebank", DATA / "financial_phrasebank" / "Sentences_50Agree.txt")
    assert Counter(ex.label for ex in examples) == {"negative": 604, "neutral": 2879, "positive": 1363}


@needs_data
def test_medical_meadow_counts():
    path = DATA / "medical_meadow" / "medical_meadow_small.json"
    examples = FORMATS["medical_meadow"].read(path)
    assert len(examples) == 5942
    assert examples[0].instruction == "Answer this question truthfully"
    assert examples[0].input == "What are the symptoms of Allergy?"
    assert examples[0].origin == f"{path}:#0" and examples[-1].origin == f"{path}:#5941"
    assert all(ex.output and ex.label is None for ex in examples)


@needs_data
def test_dolly_folder_reads_every_file_in_sorted_order():
    folder = DATA / "dolly_15k"
    examples = FORMATS["dolly"].read(folder)
    assert len(examples) == 15011
    assert Counter(ex.label for ex in examples) == {
        "open_qa": 3742, "general_qa": 2191, "classification": 2136, "closed_qa": 1773,
        "brainstorming": 1766, "information_extraction": 1506, "summarization": 1188, "creative_writing": 709,
    }
    assert examples[0].origin == f"{folder / 'global_test.json'}:#0"
    assert examples[80].origin == f"{folder / 'local_training_0.json'}:#0"
    assert examples[-1].origin.startswith(str(folder / "local_training_9.json"))
    # context becomes the input; closed_qa records carry one
    assert sum(1 for ex in examples if ex.input) > 1000
    assert any(ex.instruction == "When did Virgin Australia start operating?" for ex in examples)


@needs_data
def test_oasst1_pairs_are_rank0_english_replies_with_their_prompts():
    path = DATA / "oasst1" / "en-validation.jsonl"
    messages = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {m["message_id"]: m for m in messages}
    examples = FORMATS["oasst1"].read(path)

    rank0_replies = [m for m in messages if m["role"] == "assistant" and m["rank"] == 0]
    assert 0 < len(examples) <= len(rank0_replies)
    assert len(examples) == 418  # every rank-0 reply here has a live prompter parent
    for ex in examples:
        line = int(ex.origin.rsplit(":", 1)[1])
        reply = messages[line - 1]
        assert ex.origin == f"{path}:{line}"
        assert (reply["role"], reply["rank"], reply["lang"], reply["deleted"]) == ("assistant", 0, "en", False)
        assert ex.output == reply["text"] and ex.meta["message_id"] == reply["message_id"]
        parent = by_id[reply["parent_id"]]
        assert parent["role"] == "prompter" and not parent["deleted"]
        assert ex.instruction == parent["text"]
        assert ex.label is None


def test_oasst1_skips_deleted_messages(tmp_path):
    rows = [
        {"message_id": "p1", "parent_id": None, "role": "prompter", "text": "hi?", "lang": "en", "rank": None, "deleted": False},
        {"message_id": "a1", "parent_id": "p1", "role": "assistant", "text": "hello", "lang": "en", "rank": 0, "deleted": False},
        {"message_id": "a2", "parent_id": "p1", "role": "assistant", "text": "gone", "lang": "en", "rank": 0, "deleted": True},
        {"message_id": "p2", "parent_id": None, "role": "prompter", "text": "gone?", "lang": "en", "rank": None, "deleted": True},
        {"message_id": "a3", "parent_id": "p2", "role": "assistant", "text": "orphan", "lang": "en", "rank": 0, "deleted": False},
        {"message_id": "a4", "parent_id": "p1", "role": "assistant", "text": "second", "lang": "en", "rank": 1, "deleted": False},
        {"message_id": "a5", "parent_id": "p1", "role": "assistant", "text": "hallo", "lang": "de", "rank": 0, "deleted": False},
    ]
    path = tmp_path / "trees.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = FORMATS["oasst1"].read(path)
    assert [(ex.instruction, ex.output, ex.origin) for ex in examples] == [("hi?", "hello", f"{path}:2")]


# -- generic: one field mapping, four file kinds -----------------------------

RECORDS = [
    {"question": "What is 2+2?", "ctx": "", "answer": "4", "topic": "math"},
    {"question": "Capital of France?", "ctx": "Europe, {braces} kept", "answer": "Paris", "topic": "geo"},
    {"question": "Say hi\non two lines", "ctx": "x", "answer": "hi", "topic": "chat"},
]
MAPPING = {"instruction": "question", "input": "ctx", "output": "answer", "label": "topic"}


def _write_all_kinds(folder: Path) -> dict[str, Path]:
    paths = {kind: folder / f"records.{kind}" for kind in ("json", "jsonl", "csv", "parquet")}
    paths["json"].write_text(json.dumps(RECORDS, indent=2))
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(RECORDS[0]))
        writer.writeheader()
        writer.writerows(RECORDS)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(RECORDS), paths["parquet"])
    return paths


def test_generic_reads_json_jsonl_csv_parquet_with_a_field_mapping(tmp_path):
    paths = _write_all_kinds(tmp_path)
    expected = [(r["question"], r["ctx"], r["answer"], r["topic"]) for r in RECORDS]
    for kind, path in paths.items():
        examples = FORMATS["generic"].read(path, MAPPING)
        assert [(e.instruction, e.input, e.output, e.label) for e in examples] == expected, kind
    assert [e.origin for e in read_format("generic", paths["jsonl"], MAPPING)] == [f"{paths['jsonl']}:{n}" for n in (1, 2, 3)]
    assert [e.origin for e in read_format("generic", paths["json"], MAPPING)] == [f"{paths['json']}:#{i}" for i in range(3)]
    # the quoted two-line question spans CSV lines 4-5; the record is named by its first line
    assert [e.origin for e in read_format("generic", paths["csv"], MAPPING)] == [f"{paths['csv']}:{n}" for n in (2, 3, 4)]
    assert [e.origin for e in read_format("generic", paths["parquet"], MAPPING)] == [f"{paths['parquet']}:#{i}" for i in range(3)]


def test_generic_folder_reads_every_kind_and_default_fields(tmp_path):
    _write_all_kinds(tmp_path)
    assert len(FORMATS["generic"].read(tmp_path, MAPPING)) == 12
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (ex,) = FORMATS["generic"].read(plain)
    assert (ex.instruction, ex.input, ex.output, ex.label) == ("a", "", "b", None)


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffinstruction,output\nq,a\n".encode("utf-8"))
    (ex,) = FORMATS["generic"].read(path)
    assert (ex.instruction, ex.output, ex.origin) == ("q", "a", f"{path}:2")
    path = tmp_path / "bom.json"
    path.write_bytes(("\ufeff" + json.dumps([{"instruction": "q", "output": "a"}])).encode("utf-8"))
    assert FORMATS["generic"].read(path)[0].output == "a"


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(FedllmError, match=rf"^{path}:2: not utf-8 text"):
        FORMATS["generic"].read(path)


def test_generic_mapped_column_missing_names_line_and_columns(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(FedllmError, match=rf"^{path}:2: missing field 'answer' \(format generic"):
        FORMATS["generic"].read(path, {"instruction": "question", "output": "answer"})


def test_malformed_json_line_names_path_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    with pytest.raises(FedllmError, match=rf"^{path}:3: invalid JSON: "):
        FORMATS["generic"].read(path)


def test_malformed_json_list_names_path_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "context": "", "response": "b"},\n  {"instruction": }\n]\n')
    with pytest.raises(FedllmError, match=rf"^{path}:3: invalid JSON: "):
        FORMATS["dolly"].read(path)


def test_missing_field_names_record_and_what_the_format_needs(tmp_path):
    path = tmp_path / "dolly.json"
    path.write_text(json.dumps([
        {"instruction": "a", "context": "", "response": "b", "category": "open_qa"},
        {"instruction": "c", "context": "", "category": "open_qa"},
    ]))
    with pytest.raises(FedllmError) as err:
        FORMATS["dolly"].read(path)
    assert str(err.value) == (
        f"{path}:#1: missing field 'response' (format dolly needs instruction, context, response)"
    )


def test_phrasebank_line_without_label_names_line(tmp_path):
    path = tmp_path / "Sentences.txt"
    path.write_bytes("Profit rose .@positive\nCaf\xe9 sales fell\n".encode("iso-8859-1"))
    with pytest.raises(FedllmError, match=rf"^{path}:2: expected 'sentence@label'"):
        FORMATS["financial_phrasebank"].read(path)


def test_wrong_file_kind_and_empty_folder(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(FedllmError, match=r"format dolly reads \.json, \.jsonl files"):
        FORMATS["dolly"].read(path)
    with pytest.raises(FedllmError, match=r"no \.txt files in this folder"):
        FORMATS["financial_phrasebank"].read(tmp_path)


def test_unknown_format_lists_allowed_values(tmp_path):
    with pytest.raises(FedllmError, match=r"unknown format 'alpaca2'; allowed values: dolly, oasst1, "):
        read_format("alpaca2", tmp_path)
