"""Task suites: YAML validation, data checks, deterministic subsets, answer extraction."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from evomerge.errors import ConfigError, TaskDataError
from evomerge.scoring import load_suite, subset_examples
from evomerge.scoring.base import plan
from evomerge.scoring.extract import cut_at_stop, extract_answer, last_number, match
from evomerge.scoring.suite import parse_suite_config

FITNESS = Path(__file__).resolve().parents[1] / "fitness"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(prefix: str, n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"{prefix}-{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(start, start + n)
    ]


def _suite(tmp_path: Path, task: dict, name: str = "s") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "tasks": [task]}), encoding="utf-8")
    return path


def _gen_task(**extra) -> dict:
    return {
        "name": "add",
        "kind": "generate",
        "data": {"calibration": "d/cal.jsonl", "test": "d/test.jsonl"},
        **extra,
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    _write_jsonl(tmp_path / "d" / "cal.jsonl", _rows("cal", 30))
    _write_jsonl(tmp_path / "d" / "test.jsonl", _rows("test", 20, start=100))
    return tmp_path


def test_valid_suite_loads_with_data_relative_to_the_suite_file(data_dir: Path) -> None:
    suite = load_suite(_suite(data_dir, _gen_task(max_new_tokens=5)))
    task = suite.task("add")
    assert [len(task.examples(s)) for s in ("calibration", "test")] == [30, 20]
    assert task.examples("calibration")[3].answer == "4"
    assert task.examples("test")[0].id == "test-100"


@pytest.mark.parametrize("name", ["zoo", "zoo-2", "zoo-add-lmeval", "real", "real-general", "real-lmeval"])
def test_shipped_suites_validate(name: str) -> None:
    import yaml

    path = FITNESS / f"{name}.yaml"
    config = parse_suite_config(yaml.safe_load(path.read_text()), source=str(path))
    assert config.name == name
    for task in config.tasks:
        if task.kind == "lmeval":
            assert (path.parent / task.task_yaml).is_file()


def test_shipped_zoo_suites_load_their_data() -> None:
    for ref, skills in (("builtin:zoo", ["add", "rev", "sort"]), ("builtin:zoo-2", ["add", "rev"])):
        suite = load_suite(ref)
        assert list(suite.names) == skills
        for task in suite.tasks:
            assert task.kind == "generate" and task.spec.metric == "exact_match"
            assert len(task.examples("calibration")) > 0 and len(task.examples("test")) > 0


def test_missing_data_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"data file not found: .*cal\.jsonl"):
        load_suite(_suite(tmp_path, _gen_task()))


def test_malformed_line_names_file_and_line(data_dir: Path) -> None:
    path = data_dir / "d" / "cal.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = '{"id": "x", "prompt": "1+1=", '
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:7")):
        load_suite(_suite(data_dir, _gen_task()))


def test_missing_field_names_file_and_line(data_dir: Path) -> None:
    path = _write_jsonl(data_dir / "d" / "cal.jsonl", [*_rows("cal", 3), {"id": "z", "prompt": "9+9="}])
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:4") + ".*'answer'"):
        load_suite(_suite(data_dir, _gen_task()))


def test_unknown_kind_is_one_config_error_naming_the_yaml(tmp_path: Path) -> None:
    path = _suite(tmp_path, {"name": "t", "kind": "essay", "data": {"calibration": "x.jsonl"}})
    with pytest.raises(ConfigError, match=r"s\.yaml: tasks\[0\]\(t\).*essay") as info:
        load_suite(path)
    assert not isinstance(info.value, TaskDataError)


def test_bad_field_names_the_yaml_path(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"s\.yaml: tasks\[0\]\(add\)\.max_new_tokens"):
        load_suite(_suite(data_dir, _gen_task(max_new_tokens=0)))
    with pytest.raises(ConfigError, match=r"tasks\[0\]\(add\)\.temperature"):
        load_suite(_suite(data_dir, _gen_task(temperature=0.7)))


def test_empty_split_is_refused(data_dir: Path) -> None:
    (data_dir / "d" / "test.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match=r"test\.jsonl holds no examples"):
        load_suite(_suite(data_dir, _gen_task()))


def test_answer_regex_that_never_matches_is_refused(data_dir: Path) -> None:
    with pytest.raises(TaskDataError, match=r"answer_regex .* matches none of the 30 reference answers"):
        load_suite(_suite(data_dir, _gen_task(extract="regex", answer_regex=r"answer: (\d+)")))
    suite = load_suite(_suite(data_dir, _gen_task(extract="regex", answer_regex=r"(\d+)")))
    assert suite.task("add").spec.extract == "regex"


def test_regex_that_does_not_compile_is_a_config_error(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"answer_regex.*does not compile"):
        load_suite(_suite(data_dir, _gen_task(extract="regex", answer_regex="(")))


@pytest.mark.parametrize("clash", ["id", "prompt"])
def test_overlapping_splits_are_refused(data_dir: Path, clash: str) -> None:
    test_rows = _rows("test", 5, start=100)
    if clash == "id":
        test_rows[2]["id"] = "cal-7"
    else:
        test_rows[2]["prompt"] = "7+1="
    _write_jsonl(data_dir / "d" / "test.jsonl", test_rows)
    with pytest.raises(TaskDataError, match=r"splits 'calibration' and 'test' overlap"):
        load_suite(_suite(data_dir, _gen_task()))


def test_duplicate_ids_within_a_file_are_refused(data_dir: Path) -> None:
    rows = _rows("cal", 4)
    rows[3]["id"] = "cal-1"
    _write_jsonl(data_dir / "d" / "cal.jsonl", rows)
    with pytest.raises(TaskDataError, match=r"duplicate id 'cal-1' \(first at line 2\)"):
        load_suite(_suite(data_dir, _gen_task()))


def test_numeric_metric_needs_numeric_answers(data_dir: Path) -> None:
    rows = _rows("cal", 4)
    rows[2]["answer"] = "many"
    path = _write_jsonl(data_dir / "d" / "cal.jsonl", rows)
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:3")):
        load_suite(_suite(data_dir, _gen_task(metric="numeric")))


def test_choice_answers_must_name_an_option(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "q", "options": ["x", "y"], "answer": "y"},
        {"id": "b", "prompt": "r", "options": ["x", "y"], "answer": 5},
    ]
    _write_jsonl(tmp_path / "c.jsonl", rows)
    task = {"name": "c", "kind": "choice", "data": {"calibration": "c.jsonl"}}
    with pytest.raises(TaskDataError, match=r"c\.jsonl:2: answer 5"):
        load_suite(_suite(tmp_path, task))
    _write_jsonl(tmp_path / "c.jsonl", rows[:1])
    assert load_suite(_suite(tmp_path, task)).task("c").examples("calibration")[0].label == 1


def test_missing_split_and_unsupported_kind_fail_before_scoring(data_dir: Path) -> None:
    (data_dir / "d" / "test.jsonl").unlink()
    task = _gen_task()
    task["data"] = {"calibration": "d/cal.jsonl"}
    suite = load_suite(_suite(data_dir, task))
    with pytest.raises(ConfigError, match=r"task 'add' has no 'test' split"):
        plan(suite, "test", None, 0, kinds=("generate",), scorer="hf")
    with pytest.raises(ConfigError, match=r"cannot run task\(s\) add \(generate\)"):
        plan(suite, "calibration", None, 0, kinds=("lmeval",), scorer="lmeval")
    with pytest.raises(ConfigError, match=r"unknown split 'train'"):
        plan(suite, "train", None, 0, kinds=("generate",), scorer="hf")


def test_subsets_are_deterministic_nested_and_independent_of_file_order(data_dir: Path) -> None:
    examples = load_suite(_suite(data_dir, _gen_task())).task("add").examples("calibration")
    a = subset_examples(examples, 10, seed=3, salt="add")
    assert len(a) == 10 and a == subset_examples(examples, 10, seed=3, salt="add")
    assert [e.id for e in a] == [e.id for e in examples if e in a]  # file order kept
    assert set(subset_examples(examples, 5, seed=3, salt="add")) <= set(a)
    assert subset_examples(examples, 10, seed=4, salt="add") != a
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)
    assert {e.id for e in subset_examples(tuple(shuffled), 10, seed=3, salt="add")} == {e.id for e in a}
    assert subset_examples(examples, 1000, seed=3) == examples


def test_extraction_and_matching() -> None:
    assert cut_at_stop("168\n12", ["\n"]) == "168"
    assert cut_at_stop("ab.cd|e", ["|", "."]) == "ab"
    assert last_number("so 3 apples and 1,234.5 pears") == "1234.5"
    assert last_number("none") is None
    pat = re.compile(r"answer is (\w+)")
    assert extract_answer("the answer is 42.", "regex", pat) == "42"
    assert extract_answer("no idea", "regex", pat) is None
    assert extract_answer("  x \n", "strip") == "x"
    assert match("7.0", "7", "numeric") == 1.0
    assert match("7.1", "7", "numeric") == 0.0
    assert match("7.1", "7", "numeric", tolerance=0.2) == 1.0
    assert match("Abc", "abc", "exact_match") == 0.0
    assert match("Abc", "abc", "exact_match", ignore_case=True) == 1.0
    assert match(None, "abc", "exact_match") == 0.0


def test_declared_references_are_read_and_must_span_a_range(data_dir: Path) -> None:
    from evomerge.scoring.suite import Reference

    suite = load_suite(_suite(data_dir, _gen_task(reference={"low": 0.1, "high": 0.9})))
    assert suite.references() == {"add": Reference(low=0.1, high=0.9)}
    with pytest.raises(ConfigError, match="equal"):
        load_suite(_suite(data_dir, _gen_task(reference={"low": 0.5, "high": 0.5})))
