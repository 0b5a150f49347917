"""Data errors that name the culprit before any heavy work (issue 11 §4), and what a data file may hold (§5).

Empty files, malformed JSON lines, non-UTF-8 bytes and mixed directories fail naming the file (and line); CSV is read
as text; numbers in text fields are text; repeated rows and validation rows seen in training are warned about with
counts; a max_length that drops every row says so.
"""

from __future__ import annotations

import json
import re

import pytest
from test_data import load_all, write_rows

from taso_llm.data import DataArguments, DataFormatError, apply_length_policy, load_sft_splits
from taso_llm.io import write_text

ALPACA = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name,content", [
    ("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("empty.json", b"[]"), ("header_only.csv", b"a,b\n"),
    ("empty.csv", b""),
])
def test_empty_file_names_the_file(tmp_path, name, content):
    path = write_bytes(tmp_path / name, content)
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + r": .*no rows"):
        load_all(path)


def test_malformed_json_line_names_file_and_line(tmp_path):
    good = json.dumps(ALPACA)
    path = write_bytes(tmp_path / "bad.jsonl", f'{good}\n{good}\n{{"instruction": "x", "output": \n{good}\n'.encode())
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + r": line 3, column \d+: not valid JSON"):
        load_all(path)


def test_malformed_json_document_names_line(tmp_path):
    path = write_bytes(tmp_path / "bad.json", b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]')
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + r": line 3, column 19: not valid JSON"):
        load_all(path)


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_non_utf8_bytes_name_file_and_line(tmp_path, suffix):
    lines = ([json.dumps(ALPACA).encode()] * 2 + [b'{"instruction": "caf\xe9", "output": "x"}'] if suffix == "jsonl"
             else [b"instruction,output", b"a,b", b"caf\xe9,x"])
    path = write_bytes(tmp_path / f"latin1.{suffix}", b"\n".join(lines) + b"\n")
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + r": line 3, column \d+: not UTF-8 text "
                                                                      r"\(byte 0xe9\)"):
        load_all(path)


def test_directory_of_mixed_types_is_refused_naming_files(tmp_path):
    write_rows(tmp_path / "data" / "a.jsonl", [ALPACA])
    write_text(tmp_path / "data" / "b.csv", "instruction,output\nx,y\n")
    write_text(tmp_path / "data" / "c.csv", "instruction,output\nz,w\n")
    write_text(tmp_path / "data" / "README.md", "# not data\n")  # the hub's metadata files are not data
    with pytest.raises(DataFormatError, match=r"mixes file types \(csv: b\.csv, c\.csv; json: a\.jsonl\)"):
        load_all(tmp_path / "data")
    (tmp_path / "data" / "a.jsonl").unlink()
    write_text(tmp_path / "data" / "notes.txt", "hello\n")
    with pytest.raises(DataFormatError, match=r"\.txt: notes\.txt"):
        load_all(tmp_path / "data")


def test_csv_file_and_directory_read_as_written(tmp_path):
    # Every value as text: "007" keeps its zeros, "3.0" stays "3.0", an empty cell is "", "NA" is a word.
    csv_text = 'instruction,input,output\nPad 7 to 3 digits.,,007\nSay "NA".,"quoted, comma",NA\nHalf of 6?,,3.0\n'
    write_text(tmp_path / "one.csv", csv_text)
    rows = load_all(tmp_path / "one.csv", "alpaca")
    assert [r["completion"][0]["content"] for r in rows] == ["007", "NA", "3.0"]
    assert rows[1]["prompt"][0]["content"] == 'Say "NA".\n\nquoted, comma'
    write_text(tmp_path / "dir" / "train.csv", csv_text)
    write_text(tmp_path / "dir" / "test.csv", "instruction,input,output\nOne?,,1\n")
    split = load_sft_splits(DataArguments(dataset_name=str(tmp_path / "dir"), dataset_test_split="test"))
    assert len(split["train"]) == 3 and split["validation"][0]["completion"][0]["content"] == "1"


def test_numeric_columns_become_text(tmp_path):
    # An extra numeric column, a numeric completion, and a column Arrow widens to float (50 -> 50.0).
    rows = [{"prompt": "How many?", "completion": 50, "answer": 50, "source_id": 7},
            {"prompt": "Half of 5?", "completion": "2.5", "answer": 2.5, "source_id": 8}]
    out = load_all(write_rows(tmp_path / "nums.jsonl", rows))
    assert [(r["completion"][0]["content"], r["answer"]) for r in out] == [("50", "50"), ("2.5", "2.5")]
    assert "source_id" not in out.column_names


def test_repeated_rows_are_counted_and_warned(tmp_path, caplog):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    rows += [rows[0], rows[0], rows[1]]  # 3 repeats of earlier rows
    path = write_rows(tmp_path / "dups.jsonl", rows)
    with caplog.at_level("WARNING", logger="taso_llm"):
        split = load_sft_splits(DataArguments(dataset_name=str(path), validation_size=0))
    assert len(split["train"]) == 23
    assert any("3 of 23 training rows repeat an earlier row" in r.getMessage() for r in caplog.records)

    # Held out from a pool where one row is 15 of 20: both splits surely hold it. Count the overlap by hand.
    path = write_rows(tmp_path / "skewed.jsonl", [rows[0]] * 15 + rows[1:6])
    caplog.clear()
    with caplog.at_level("WARNING", logger="taso_llm"):
        split = load_sft_splits(DataArguments(dataset_name=str(path), validation_size=10), seed=1)
    train = {(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in split["train"]}
    overlap = sum((r["prompt"][0]["content"], r["completion"][0]["content"]) in train for r in split["validation"])
    assert overlap >= 5
    assert any(f"{overlap} of 10 validation rows also occur in the training split" in r.getMessage()
               for r in caplog.records)


def test_validation_rows_seen_in_training_are_counted(tmp_path, caplog):
    write_rows(tmp_path / "ds" / "train.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(10)])
    write_rows(tmp_path / "ds" / "test.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in (1, 2, 30)])
    with caplog.at_level("WARNING", logger="taso_llm"):
        load_sft_splits(DataArguments(dataset_name=str(tmp_path / "ds"), dataset_test_split="test"))
    assert any("2 of 3 validation rows also occur in the training split" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_max_length_that_drops_every_row_is_an_error(tmp_path, tiny_tokenizer, policy):
    rows = load_all(write_rows(tmp_path / "r.jsonl", [{"prompt": "Say hi.", "completion": "hi there"}] * 2))
    full = len(tiny_tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], tokenize=True,
                                                  return_dict=True)["input_ids"])
    prompt = len(tiny_tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
    limit = prompt if policy == "truncate" else full - 1  # one token short of keeping a row
    with pytest.raises(ValueError, match=rf"max_length={limit} with max_length_policy='{policy}' leaves no training "
                                         rf"rows: all 2 dropped.*needs max_length >= {limit + 1}"):
        apply_length_policy(rows, tiny_tokenizer, limit, policy)
    assert len(apply_length_policy(rows, tiny_tokenizer, limit + 1, policy)[0]) == 2
