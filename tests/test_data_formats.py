"""Bring your own data, without a server: every format easyep_sglang.core.datasets_io reads gives the same records and
problems as the equivalent JSONL; data that cannot be used is refused in one line naming the fix, before any server
starts; select refuses statistics without tokens and warns when ties choose the kept experts. Through servers:
test_calibrate_formats.py and test_accuracy_formats.py."""

import json
import re
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from easyep_sglang.eval import accuracy

from easyep_sglang.serving import calibrate

from easyep_sglang.core import selection as select
from easyep_sglang.core.datasets_io import DataError
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.core.stats import ExpertStats
from easyep_sglang.serving.calibration_data import Sample, fit_to_context, read_prompts
from easyep_sglang.serving.server_process import free_port

# (prompt, response); the tiny tokenizer makes one token per character
PAIRS = [
    ("Q: What is 37 + 48? A:", " 37 + 48 = 85, so the answer is 85."),
    ("def add(a, b):\n", "    return a + b\n\nprint(add(2, 3))\n"),
    ("The license grants you", " a non-exclusive, worldwide, royalty-free right to use, copy and modify the work."),
    ("Q: 12 * 3? A:", " 36"),
]


def write_formats(rows: list[dict], folder: Path) -> dict[str, tuple[Path, str | None]]:
    """The same rows as JSONL (today's format), JSON, Parquet, CSV, an Arrow file, a folder saved with
    save_to_disk, and as the "test" split of a saved DatasetDict and of a folder of files named by split:
    name -> (path, split)."""
    folder.mkdir(parents=True)
    dataset = datasets.Dataset.from_list(rows)
    paths = {name: folder / f"data.{name}" for name in ("jsonl", "json", "parquet", "csv")}
    paths["jsonl"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    paths["json"].write_text(json.dumps(rows))
    dataset.to_parquet(str(paths["parquet"]))
    dataset.to_csv(str(paths["csv"]), index=False)
    dataset.save_to_disk(str(folder / "saved"))
    [arrow] = (folder / "saved").glob("*.arrow")
    paths["arrow"] = shutil.copy(arrow, folder / "data.arrow")
    datasets.DatasetDict(train=dataset.select([0]), test=dataset).save_to_disk(str(folder / "saved_dict"))
    (folder / "by_split").mkdir()
    (folder / "by_split" / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    shutil.copy(paths["jsonl"], folder / "by_split" / "test.jsonl")
    return {**{name: (Path(path), None) for name, path in paths.items()}, "saved": (folder / "saved", None),
            "saved_dict": (folder / "saved_dict", "test"), "by_split": (folder / "by_split", "test")}


@pytest.mark.parametrize("layout", [("prompt", "response"), ("input", "output"), ("text", "completion")])
def test_every_format_reads_the_same_records(tmp_path, layout):
    rows = [{layout[0]: prompt, layout[1]: response} for prompt, response in PAIRS]
    expected = [{"text": prompt, "response": response} for prompt, response in PAIRS]
    for name, (path, split) in write_formats(rows, tmp_path / "data").items():
        assert read_prompts(path, split, use_responses=True) == expected, name


def test_problems_from_answers_and_boxed_solutions(tmp_path):
    rows = [{"problem": "Find x.", "answer": "204"}, {"problem": "Half?", "answer": "\\frac{1}{2}"}]
    solutions = [{"problem": "Find x.", "solution": "So x = \\boxed{200} + 4 = \\boxed{204}."},
                 {"problem": "Half?", "solution": "It is \\boxed{\\frac{1}{2}}"}]
    expected = [accuracy.Problem("Find x.", "204"), accuracy.Problem("Half?", "\\frac{1}{2}")]
    for layout, data in (("answer", rows), ("solution", solutions)):
        for name, (path, split) in write_formats(data, tmp_path / layout).items():
            assert accuracy.load_problems(path, split) == expected, (layout, name)
    mixed = tmp_path / "mixed.jsonl"  # AIME-style integer answers beside LaTeX ones
    mixed.write_text("".join(json.dumps({**row, "answer": 204} if n == 0 else row) + "\n" for n, row in enumerate(rows)))
    assert accuracy.load_problems(mixed) == expected
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"question": "Q?", "answer": "7", "solution": "\\boxed{8}"}) + "\n")
    assert accuracy.load_problems(both) == [accuracy.Problem("Q?", "7")]
    assert accuracy.load_problems(both, answer_field="solution") == [accuracy.Problem("Q?", "8")]


@pytest.fixture
def no_server(monkeypatch):
    """Fails the test if calibrate tries to start a server."""
    class Refused:
        def __init__(self, *args, **kwargs):
            raise AssertionError("calibrate started a server")

    monkeypatch.setattr(calibrate, "LaunchedServer", Refused)


def bad_data(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("empty.jsonl", "query.jsonl", "prompts.jsonl", "long.jsonl",
                                                "unboxed.jsonl", "notes.yaml")}
    paths["empty.jsonl"].write_text("\n")
    paths["query.jsonl"].write_text('{"query": "2+2?", "label": "4"}\n')
    paths["prompts.jsonl"].write_text('{"prompt": "2+2?"}\n')
    paths["long.jsonl"].write_text(json.dumps({"input": "Q:", "output": "x" * 5000}) + "\n")  # context: 4096
    paths["unboxed.jsonl"].write_text('{"problem": "2+2?", "solution": "It is 4."}\n')
    paths["notes.yaml"].write_text("a: 1\n")
    datasets.DatasetDict(train=datasets.Dataset.from_list([{"text": "a"}]),
                         test=datasets.Dataset.from_list([{"text": "b"}])).save_to_disk(str(tmp_path / "splits"))
    return {**paths, "splits": tmp_path / "splits"}


CALIBRATE_REFUSALS = [
    ("empty.jsonl", [], r"empty.jsonl is empty; pass a file with at least one row"),
    ("query.jsonl", [], r"has no prompt field .* its fields are \['query', 'label'\]: name the prompt field with "
                        r"--prompt-field FIELD"),
    ("query.jsonl", ["--prompt-field", "question"], r"has no field 'question' \(--prompt-field\); its fields are"),
    ("prompts.jsonl", ["--use-responses"], r"has no response field .*--response-field FIELD, or drop --use-responses"),
    ("splits", [], r"has the splits \['train', 'test'\]; choose one with --split"),
    ("splits", ["--split", "validation"], r"has no split 'validation'; its splits are \['train', 'test'\]"),
    ("prompts.jsonl", ["--split", "test"], r"single file, which has no splits; drop --split test"),
    ("notes.yaml", [], r"unknown format '.yaml'; pass .jsonl, .json, .parquet"),
    ("long.jsonl", ["--use-responses"], r"1 of 1 prompt\+response samples are longer than the 4096 tokens of the "
                                        r"model's context .*pass --truncate-responses"),
]


@pytest.mark.parametrize("name, flags, message", CALIBRATE_REFUSALS)
def test_calibrate_refuses_bad_data_before_a_server_starts(tiny_models_fp32, tmp_path, no_server, name, flags, message):
    path = bad_data(tmp_path)[name]
    argv = ["--model-path", str(tiny_models_fp32["deepseek_v3"]), "--prompts", str(path), "--domain", "d",
            "--out", str(tmp_path / "stats.safetensors"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main(argv)
    line = str(exit_info.value.code)
    assert "\n" not in line and line.startswith("easyep calibrate: error: "), line
    assert re.search(message, line), line
    assert not (tmp_path / "stats.safetensors").exists()


@pytest.mark.parametrize("name, flags, message", [
    ("empty.jsonl", [], "is empty"),
    ("query.jsonl", [], r"has no problem field .* its fields are \['query', 'label'\]: .*--problem-field FIELD"),
    ("prompts.jsonl", [], r"has no answer field \(looked for 'answer', 'solution'\).*--answer-field FIELD"),
    ("unboxed.jsonl", [], r"row 1: 'solution' holds no complete \\boxed\{\} answer; .*--answer-field"),
    ("splits", ["--split", "dev"], r"has no split 'dev'"),
])
def test_accuracy_refuses_bad_data_before_sampling(tmp_path, capsys, name, flags, message):
    path = bad_data(tmp_path)[name]
    capsys.readouterr()  # the set-up's own output
    nobody = f"http://127.0.0.1:{free_port()}"  # never reached: the data is refused first
    with pytest.raises(SystemExit):
        accuracy.main(["--base-url", nobody, "--model", "m", "--data", str(path), "--out", str(tmp_path / "r.jsonl"),
                       *flags])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("easyep: error: ") and re.search(message, line), line
    assert not (tmp_path / "r.jsonl").exists()


def test_long_responses_are_cut_with_a_count_or_refused(capsys):
    samples = [Sample((1, 2, 3), (4, 5, 6, 7, 8, 9)), Sample((1, 2), (3,))]
    fitted = fit_to_context(samples, 5, "a test limit", truncate=True)
    assert fitted == [Sample((1, 2, 3), (4, 5)), samples[1]]
    assert "truncated the responses of 1 of 2 samples to fit the 5 tokens of a test limit: 4 response tokens " \
           "dropped" in capsys.readouterr().err
    with pytest.raises(DataError, match="1 of 2 prompt\\+response samples are longer than the 5 tokens .* longest: 9"):
        fit_to_context(samples, 5, "a test limit", truncate=False)
    with pytest.raises(DataError, match="prompt 1 has 3 \\+ --max-new-tokens 4 tokens, more than the 5"):
        fit_to_context(samples, 5, "a test limit", truncate=True, room=4)
    assert fit_to_context(samples, 9, "a test limit", truncate=False) == samples


def write_zero_stats(path: Path, model: Path, tokens: list[int], frequency_rows=None) -> str:
    spec = spec_from_model_path(model)
    stats = ExpertStats.zeros(spec)
    stats.tokens.copy_(torch.tensor(tokens))
    if frequency_rows is not None:
        stats.frequency.copy_(torch.tensor(frequency_rows, dtype=torch.float64))
    stats.save(path, {"model": spec.identity(), "samples": 0 if not any(tokens) else 1})
    return str(path)


def test_select_refuses_statistics_without_tokens_and_warns_on_ties(tiny_models_fp32, tmp_path, capsys):
    model = tiny_models_fp32["deepseek_v3"]
    spec = spec_from_model_path(model)
    out = tmp_path / "mask.json"

    def run(stats: str) -> None:
        select.main(["--stats", stats, "--method", "frequency", "--keep", "8", "--model-path", str(model),
                     "--out", str(out)])

    # What `calibrate --prompts empty.jsonl` once wrote: every sum and count 0.
    with pytest.raises(SystemExit, match="holds no calibration tokens \\(0 samples\\); calibrate on prompts"):
        run(write_zero_stats(tmp_path / "zero.safetensors", model, [0] * len(spec.moe_layers)))
    with pytest.raises(SystemExit, match=f"MoE layers \\[{spec.moe_layers[-1]}\\] recorded no tokens"):
        run(write_zero_stats(tmp_path / "half.safetensors", model, [12] + [0] * (len(spec.moe_layers) - 1)))
    assert not out.exists()
    distinct = [[float(e + 1 + 16 * layer) for e in range(16)] for layer in range(len(spec.moe_layers))]
    run(write_zero_stats(tmp_path / "distinct.safetensors", model, [12] * len(spec.moe_layers), distinct))
    assert "warning" not in capsys.readouterr().err and out.exists()
    sparse = [[3.0, 2.0] + [0.0] * 14, distinct[1]]  # layer 1: two experts seen, the other 6 of 8 kept by expert id
    run(write_zero_stats(tmp_path / "sparse.safetensors", model, [12] * len(spec.moe_layers), sparse))
    err = capsys.readouterr().err
    assert f"warning: in 1 of 2 MoE layers, experts of equal score decided more than 25% of the kept set " \
           f"(layer {spec.moe_layers[0]}: 6 of 8); calibrate on more tokens" in err, err
