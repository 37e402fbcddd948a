"""Corpora (file, directory, glob, .npy, .bin, tokenizer.json) and batches."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from train import data as data_lib
from train.config import TrainError


def make_tree(root, count=90):
    """``count`` small text files plus one note that a ``*.txt`` glob must skip."""
    texts = {}
    for i in range(count):
        path = root / "src" / f"file{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        texts[path] = f"def f{i}(x):\n    return x * {i}\n".encode() * 3
        path.write_bytes(texts[path])
    (root / "src" / "notes.md").write_text("not python\n")
    return texts


def expected_split(texts, root):
    val = [p for p in sorted(texts) if zlib.crc32(str(p.relative_to(root)).encode()) % 20 == 0]
    train = [p for p in sorted(texts) if p not in val]
    return b"".join(texts[p] for p in train), b"".join(texts[p] for p in val)


def test_single_file_is_split_at_its_tail(tmp_path):
    text = bytes(range(256)) * 40
    (tmp_path / "a.txt").write_bytes(text)
    corpus = data_lib.load_corpus(str(tmp_path / "a.txt"))
    cut = len(text) - int(len(text) * 0.05)
    assert corpus.train.tobytes() == text[:cut] and corpus.val.tobytes() == text[cut:]
    assert corpus.vocab_size == 256 and corpus.bytes_per_token == 1.0


def test_directory_and_glob_split_by_file_hash(tmp_path):
    texts = make_tree(tmp_path)
    corpus = data_lib.load_corpus(str(tmp_path / "src" / "*.txt"))
    train, val = expected_split(texts, tmp_path / "src")
    assert val, "files 80 and 81 hash into validation"
    assert corpus.train.tobytes() == train and corpus.val.tobytes() == val
    whole = data_lib.load_corpus(str(tmp_path / "src"))  # the directory adds notes.md
    assert len(whole.train) + len(whole.val) == len(train) + len(val) + len("not python\n")
    # validation files shorter than one window (--seq-len + 2): the tail split instead
    short = data_lib.load_corpus(str(tmp_path / "src" / "*.txt"), min_val_tokens=len(val) + 1)
    everything = train + val
    cut = len(everything) - int(len(everything) * 0.05)
    assert short.train.tobytes() == everything[:cut] and short.val.tobytes() == everything[cut:]
    assert short.bytes_per_token == 1.0


def test_npy_and_bin_token_arrays(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, size=5000).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    tokens.astype(np.uint16).tofile(tmp_path / "tokens.bin")
    for name in ("tokens.npy", "tokens.bin"):
        corpus = data_lib.load_corpus(str(tmp_path / name))
        np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), tokens)
        assert len(corpus.val) == 250 and corpus.vocab_size == tokens.max() + 1
        assert corpus.bytes_per_token is None  # no bits/byte for pre-tokenized ids


def test_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    texts = make_tree(tmp_path)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"])
    tok.train_from_iterator([t.decode() for t in texts.values()], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))

    corpus = data_lib.load_corpus(str(tmp_path / "src" / "*.txt"), str(tmp_path / "tokenizer.json"))
    _, val = expected_split(texts, tmp_path / "src")
    expected_ids = np.concatenate([tok.encode(texts[p].decode()).ids for p in sorted(texts)
                                   if zlib.crc32(str(p.relative_to(tmp_path / "src")).encode()) % 20])
    np.testing.assert_array_equal(corpus.train, expected_ids)
    assert corpus.vocab_size == tok.get_vocab_size()
    assert corpus.bytes_per_token == pytest.approx(len(val) / len(corpus.val))


@pytest.mark.parametrize("make,needle", [
    (lambda p: str(p / "missing.txt"), "no such file"),
    (lambda p: (p / "empty.txt").write_text("") and None or str(p / "empty.txt"), "empty"),
    (lambda p: (p / "d").mkdir() or str(p / "d"), "holds no files"),
    (lambda p: str(p / "*.nothing"), "matches no files"),
    (lambda p: np.save(p / "m.npy", np.zeros((2, 3), np.int32)) or str(p / "m.npy"), "1-D integer"),
    (lambda p: np.save(p / "n.npy", np.array([1, -2])) or str(p / "n.npy"), ">= 0"),
])
def test_bad_data_paths(tmp_path, make, needle):
    with pytest.raises(TrainError, match=needle):
        data_lib.load_corpus(make(tmp_path))


def test_stdlib_corpus_files_are_the_standard_library():
    files = data_lib.stdlib_files()
    names = {f.name for f in files}
    assert {"os.py", "textwrap.py", "json"} & names >= {"os.py", "textwrap.py"}
    assert not any("site-packages" in f.parts for f in files)
    train, val = data_lib.split_files(files)
    assert 0.02 < len(val) / len(files) < 0.10 and not set(train) & set(val)


def test_batches_depend_only_on_seed_and_step_and_split_over_hosts():
    tokens = np.arange(10_000, dtype=np.int32) % 251
    sampler = data_lib.BatchSampler(tokens, batch_size=8, seq_len=16, seed=3)
    again = data_lib.BatchSampler(tokens, batch_size=8, seq_len=16, seed=3)
    np.testing.assert_array_equal(sampler.batch(7), again.batch(7))  # a resumed run's batch
    assert not np.array_equal(sampler.batch(7), sampler.batch(8))
    offsets = sampler.offsets(7)
    for row, start in zip(sampler.batch(7), offsets):
        np.testing.assert_array_equal(row, tokens[start:start + 17])
    hosts = [data_lib.BatchSampler(tokens, 8, 16, 3, process_index=i, process_count=2) for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h.batch(7) for h in hosts]), sampler.batch(7))
    with pytest.raises(TrainError, match="divide evenly"):
        data_lib.BatchSampler(tokens, 8, 16, 3, process_index=0, process_count=3)


def test_eval_batches_are_fixed_windows():
    val = np.arange(1000, dtype=np.int32)
    batches = data_lib.eval_batches(val, batch_size=4, seq_len=9, num_batches=3)
    assert len(batches) == 3 and all(b.shape == (4, 10) for b in batches)
    starts = np.concatenate([b[:, 0] for b in batches])
    assert starts[0] == 0 and starts[-1] == 1000 - 10
    for b in batches:
        np.testing.assert_array_equal(b, b[:, :1] + np.arange(10))
    with pytest.raises(TrainError, match="validation split"):
        data_lib.eval_batches(val[:5], 4, 9, 1)


def test_resume_note_names_every_flag_that_changes_the_batches():
    """A resumed run whose --batch-size or --seq-len differ from the checkpoint's draws other
    batches; the note used to name only the seed and the data (and tokens_seen counted the
    whole run at the new batch shape)."""
    from train.config import TrainConfig
    from train.loop import resume_differences, tokens_seen

    tokens = np.arange(10_000, dtype=np.int32) % 251
    saved = TrainConfig(batch_size=8, seq_len=16, seed=3)
    meta = {"seed": 3, "data": "fp", "batch_size": 8, "seq_len": 16, "tokens_seen": 5 * 8 * 16}
    batch = lambda c: data_lib.BatchSampler(tokens, c.batch_size, c.seq_len, c.seed).batch(5)  # noqa: E731
    for flags in ({}, dict(batch_size=4), dict(seq_len=8), dict(seed=4), dict(batch_size=4, seed=4)):
        now = saved.replace(**flags)
        same = np.array_equal(batch(saved), batch(now))
        changed = resume_differences(meta, now, "fp")
        assert (changed == []) == same, flags
        assert sorted(changed) == sorted(f"--{k.replace('_', '-')}" for k in flags)
    assert resume_differences({"seed": 3, "data": "fp"}, saved, "fp") == []  # an older checkpoint
    assert resume_differences(meta, saved, "other") == ["--data"]
    assert tokens_seen(meta, 5, 7, saved.replace(batch_size=4)) == 5 * 8 * 16 + 2 * 4 * 16
