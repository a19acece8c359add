"""read_texts: every format, chat rendering, and every user error as a one-line DataError."""

from __future__ import annotations

import json

import pytest

from kompakt.data import read_texts
from kompakt.errors import DataError
from kompakt.model.tiny import tiny_tokenizer

CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]},
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _rendered(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=False)


def test_txt_md_directory_and_list(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# second\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == ["first document\n"]
    assert read_texts(str(tmp_path)) == ["first document\n", "# second\n", "third"]
    assert read_texts([tmp_path / "b.md", tmp_path / "a.txt"]) == ["# second\n", "first document\n"]


def test_utf8_bom_and_multibyte_at_sniff_boundary(tmp_path):
    path = tmp_path / "u.txt"
    text = "x" * 8191 + "é" + " ok 😀"  # 'é' straddles the 8192-byte sniff window
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_texts(path) == [text]


def test_jsonl_text_and_custom_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two", "id": 3}])
    assert read_texts(path) == ["one", "two"]
    other = _jsonl(tmp_path / "e.jsonl", [{"body": "x"}, {"body": "y"}])
    assert read_texts(other, text_field="body") == ["x", "y"]


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    assert read_texts(path) == ["a", "b"]


def test_chat_jsonl_rendered_with_template(tmp_path):
    tokenizer = tiny_tokenizer()
    texts = read_texts(_jsonl(tmp_path / "chat.jsonl", CHAT), tokenizer=tokenizer)
    assert texts[0] == _rendered(tokenizer, CHAT[0]["messages"])
    assert texts[0] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert texts[1] == "<|im_start|>user\nparts<|im_end|>\n"


def test_chat_without_template_joins_contents(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    assert read_texts(_jsonl(tmp_path / "chat.jsonl", CHAT[:1]), tokenizer=tokenizer) == ["hi\n\nhello"]


def test_parquet_text_and_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["p1", None, "p2"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    assert read_texts(tmp_path / "t.parquet") == ["p1", "p2"]
    pq.write_table(pa.table({"messages": [CHAT[0]["messages"]]}), tmp_path / "c.parquet")
    tokenizer = tiny_tokenizer()
    assert read_texts(tmp_path / "c.parquet", tokenizer=tokenizer) == [_rendered(tokenizer, CHAT[0]["messages"])]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="no 'text' or 'messages' column"):
        read_texts(tmp_path / "bad.parquet")


def test_saved_hf_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["d1", "d2"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_texts(tmp_path / "ds") == ["d1", "d2"]
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["tr"]}),
        test=datasets.Dataset.from_dict({"text": ["te"]}),
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert read_texts(tmp_path / "dd") == ["tr"]
    (tmp_path / "ds" / "extra.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(DataError, match="never unpickles"):
        read_texts(tmp_path / "ds")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b" \n\n\t", "is empty"),
        ("nul.txt", b"text\x00\x01\x02", "binary"),
        ("latin1.txt", "café au lait".encode("latin-1"), "not UTF-8 text"),
        ("late.txt", b"a" * 10000 + b"\xff", "not valid UTF-8"),
        ("data.csv", b"a,b\n", "unknown data format '.csv'"),
        ("noext", b"text", "unknown data format"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json\n', "line 2: invalid JSON"),
        ("list.jsonl", b'["a"]\n', "line 1: expected a JSON object"),
        ("field.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "line 2: no string 'text' field"),
        ("nochat.jsonl", b'{"messages": [{"role": "user", "content": "x"}]}\n{"other": 1}\n',
         "line 2: chat record without 'messages'"),
        ("badmsg.jsonl", b'{"messages": [{"role": "user", "content": "x"}]}\n{"messages": [{"role": 1}]}\n',
         "line 2: message 0 is not"),
        ("notlist.jsonl", b'{"messages": "hello"}\n', "line 1: 'messages' must be a non-empty list"),
        ("norecords.jsonl", b"\n\n  \n", "is empty"),
    ],
)
def test_file_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        read_texts(path, tokenizer=tiny_tokenizer())
    assert "\n" not in str(info.value)


def test_missing_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        read_texts(tmp_path / "empty")
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text(" \n")
    with pytest.raises(DataError, match="holds no text"):
        read_texts(tmp_path / "empty")


def test_chat_needs_tokenizer(tmp_path):
    with pytest.raises(DataError, match="pass tokenizer="):
        read_texts(_jsonl(tmp_path / "chat.jsonl", CHAT))


def test_chat_template_rejection_is_data_error(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="line 1: the chat template rejected"):
        read_texts(_jsonl(tmp_path / "chat.jsonl", CHAT), tokenizer=tokenizer)


def test_wikitext_suffixes_are_text(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" = A = \n", encoding="utf-8")
    (tmp_path / "wiki.valid.tokens").write_text(" b <unk> \n", encoding="utf-8")
    assert read_texts(tmp_path) == [" = A = \n", " b <unk> \n"]


def test_windows_line_endings_read_like_text_mode(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"line one\r\nline two\rline three\r\n")
    with open(path, encoding="utf-8") as handle:
        assert read_texts(path) == [handle.read()]
