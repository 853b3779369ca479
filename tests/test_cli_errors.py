"""Bad input: a one-line error naming file:line or the config field, a non-zero
exit, and no run dir that looks complete (no summary.json)."""

import json


from conftest import TINY_CONFIG, TINY_RUN
from fedllm.cli import main


def run_cli(capsys, tmp_path, *overrides):
    out = tmp_path / "run"
    code = main(["run", str(TINY_CONFIG), "--out", str(out), "--no-progress", *sum((["--set", o] for o in TINY_RUN + list(overrides)), [])])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, out


def assert_failed_cleanly(code, err, out, *fragments):
    assert code != 0
    assert len(err) >= 1 and err[-1].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[-1], err[-1]
    assert not (out / "summary.json").exists()


def one_source(path, fmt="generic"):
    # replace the demo's three sources by one file of ours
    return [
        f"data.sources=[{{name: mine, format: {fmt}, path: {path}}}]",
    ]


def test_malformed_json_line(capsys, tmp_path):
    bad = tmp_path / "site.jsonl"
    rows = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(20)]
    rows[6] = '{"instruction": "broken", "output": '
    bad.write_text("\n".join(rows) + "\n")
    code, err, out = run_cli(capsys, tmp_path, *one_source(bad))
    assert_failed_cleanly(code, err, out, f"{bad}:7", "invalid JSON")


def test_missing_field(capsys, tmp_path):
    bad = tmp_path / "dolly.json"
    bad.write_text(json.dumps([{"instruction": "q", "context": "", "response": "a", "category": "open_qa"}, {"instruction": "q2", "context": ""}]))
    code, err, out = run_cli(capsys, tmp_path, *one_source(bad, "dolly"))
    assert_failed_cleanly(code, err, out, str(bad), "missing field 'response'")


def test_site_left_empty(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err, out = run_cli(capsys, tmp_path, f"data.sources.2.path={empty}", "data.sources.2.format=generic")
    assert_failed_cleanly(code, err, out, "medical")


def test_dirichlet_alpha_not_positive(capsys, tmp_path):
    code, err, out = run_cli(capsys, tmp_path, "data.partition.strategy=dirichlet", "data.partition.num_sites=3", "data.partition.alpha=-1")
    assert_failed_cleanly(code, err, out, "data.partition.alpha")


def test_more_sites_than_records(capsys, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(5)) + "\n")
    code, err, out = run_cli(capsys, tmp_path, *one_source(small), "data.partition.strategy=iid", "data.partition.num_sites=10")
    assert_failed_cleanly(code, err, out, "10 sites", "5 records")


def test_unknown_method(capsys, tmp_path):
    code, err, out = run_cli(capsys, tmp_path, "method.name=qlora")
    assert_failed_cleanly(code, err, out, "method.name", "allowed values: sft, lora, ptuning, prompt_tuning, ia3")


def test_model_path_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, err, out = run_cli(capsys, tmp_path, f"model.source={missing}")
    assert_failed_cleanly(code, err, out, f"model path {missing}: does not exist")


def test_model_dir_without_weights(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    code, err, out = run_cli(capsys, tmp_path, f"model.source={model}")
    assert_failed_cleanly(code, err, out, "no weights")


def test_partition_that_would_leave_a_site_empty(capsys, tmp_path):
    # 60 sentences, 3 labels, 6 sites and a very skewed Dirichlet: some site always ends up empty
    code, err, out = run_cli(
        capsys,
        tmp_path,
        "data.sources=[{name: fpb, format: financial_phrasebank, path: financial_phrasebank/Sentences_AllAgree.txt, max_records: 60}]",
        "data.partition.strategy=dirichlet",
        "data.partition.num_sites=6",
        "data.partition.alpha=0.01",
        "data.partition.min_site_records=5",
    )
    assert_failed_cleanly(code, err, out, "data.partition.min_site_records", "smallest site in the last draw: 0")
    assert not (out / "data" / "partition.json").exists()
