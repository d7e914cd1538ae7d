"""Loaders: TRACE folders, JSONL and `datasets` files end in the same validated Tasks."""

from __future__ import annotations

import json

import pytest

from clbench.data.loaders import StreamConfig, TaskConfig, load_stream, load_task, subsample
from clbench.errors import ConfigError


def _rows(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"{tag}q{i}", "answer": f"a{i % 2}"} for i in range(n)]


def test_trace_folder_with_caps_and_labels(trace_dir):
    cfg = TaskConfig(name="parity", path="parity", n_train=10, n_test=5, classification=True)
    task = load_task(cfg, trace_dir, seed=7)
    assert (len(task.train), len(task.eval), len(task.test)) == (10, 4, 5)
    assert task.labels == ["no", "yes"] and task.majority_baseline() is not None
    again = load_task(cfg, trace_dir, seed=7)
    other = load_task(cfg, trace_dir, seed=8)
    assert again.train == task.train  # seeded: the same subsample every time
    assert other.train != task.train


def test_subsample_keeps_order_and_is_a_subset():
    items = list(range(100))
    picked = subsample(items, 10, seed=1, key="t:train")
    assert len(picked) == 10 and picked == sorted(picked) and set(picked) <= set(items)
    assert subsample(items, None, 1, "k") is items and subsample(items, 200, 1, "k") is items


def test_jsonl_with_field_mapping_and_template(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        lines = [json.dumps({"question": f"q{i}", "ctx": "c", "label": i}) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = TaskConfig(
        name="qa", path="qa", loader="jsonl", prompt_template="{ctx}: {question}?", answer_field="label"
    )
    task = load_task(cfg, tmp_path, seed=0)
    assert task.train[2].prompt == "c: q2?" and task.train[2].answer == "2"  # numbers become strings
    assert task.eval == [] and len(task.test) == 3  # eval is optional for JSONL


def test_hf_datasets_local_files(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text(json.dumps([{"text": f"t{i}", "y": "z"} for i in range(4)]))
    cfg = TaskConfig(
        name="hf",
        path=str(folder),
        loader="hf",
        prompt_field="text",
        answer_field="y",
        hf_splits={"train": "train", "test": "test"},
    )
    task = load_task(cfg, tmp_path, seed=0)
    assert [e.prompt for e in task.train] == ["t0", "t1", "t2", "t3"] and task.test[0].answer == "z"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "x", "answer": "y"}', "expected a JSON list"),
        ('[["x", "y"]]', "item 1 is list, not an object"),
        ('[{"prompt": "x", "answer": 3}]', "field 'answer' is missing or not a string"),
        ("[]", "the split is empty"),
        ("[{", "not valid JSON"),
    ],
)
def test_bad_trace_files_name_file_and_field(trace_dir, content, message):
    (trace_dir / "upper" / "train.json").write_text(content)
    with pytest.raises(ConfigError) as err:
        load_task(TaskConfig(name="upper", path="upper"), trace_dir, seed=0)
    assert str(trace_dir / "upper" / "train.json") in str(err.value) and message in str(err.value)


def test_stream_rejects_repeated_names_and_empty(trace_dir):
    with pytest.raises(ConfigError, match="repeat"):
        load_stream(
            StreamConfig(
                tasks=[TaskConfig("a", "parity"), TaskConfig("a", "upper")], data_root=str(trace_dir)
            )
        )
    with pytest.raises(ConfigError, match="no tasks"):
        load_stream(StreamConfig(tasks=[]))


def test_score_split_eval_scores_the_eval_examples_and_never_the_test_ones(trace_dir):
    tasks = [TaskConfig("parity", "parity"), TaskConfig("upper", "upper")]
    on_test = load_stream(StreamConfig(tasks=tasks, data_root=str(trace_dir)))
    on_eval = load_stream(StreamConfig(tasks=tasks, data_root=str(trace_dir), score_split="eval"))
    for a, b in zip(on_test, on_eval, strict=True):
        assert b.test == a.eval and b.eval == a.eval and b.train == a.train
        assert b.test != a.test
    assert (on_test.score_split, on_eval.score_split) == ("test", "eval")  # results.md says which


def test_jsonl_errors_name_the_line_an_editor_shows(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n')
    (folder / "test.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ConfigError, match=r"train.jsonl: line 3: field 'answer' is missing"):
        load_task(TaskConfig(name="t", path="t", loader="jsonl"), tmp_path, seed=0)


def test_two_tasks_reading_the_same_data_are_refused(trace_dir, tmp_path):
    same_files = [TaskConfig("a", "parity"), TaskConfig("b", "./parity/")]
    with pytest.raises(ConfigError, match=r"stream.tasks\[b\].path: reads the same data as task a"):
        load_stream(StreamConfig(tasks=same_files, data_root=str(trace_dir)))
    import shutil

    shutil.copytree(trace_dir / "parity", trace_dir / "parity-copy")
    copied = [TaskConfig("a", "parity"), TaskConfig("b", "parity-copy")]
    with pytest.raises(
        ConfigError, match=r"stream.tasks\[b\]: its train and test examples are those of task a"
    ):
        load_stream(StreamConfig(tasks=copied, data_root=str(trace_dir)))
    other_subsets = [TaskConfig("a", "parity", n_train=4, n_test=4), TaskConfig("b", "upper")]
    assert len(load_stream(StreamConfig(tasks=other_subsets, data_root=str(trace_dir)))) == 2


def test_a_single_test_example_has_no_standard_error(trace_dir, capsys):
    from clbench.evaluation.evaluator import score_task

    task = load_task(TaskConfig("parity", "parity", n_test=1), trace_dir, seed=0)
    assert "its test split holds one example" in capsys.readouterr().out
    one = score_task(task, [task.test[0].answer])
    assert one.score == 1.0 and one.n == 1 and one.stderr is None
    two = load_task(TaskConfig("parity", "parity", n_test=2), trace_dir, seed=0)
    both = score_task(two, [two.test[0].answer, "wrong"])
    assert both.stderr == pytest.approx(0.5)  # sample std 0.707 / sqrt(2)
