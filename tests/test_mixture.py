"""Mixtures: shares follow the weights, epochs match hand counts, batches are reproducible, resumable and
the same for 1 or 2 processes (and 0 or 2 workers); config errors name the source; every source format
(Parquet, ArrayRecord text, TFDS) trains through the one pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxllm.config import ConfigError, DataConfig
from jaxllm.data import Component, Mixture, lm_pipeline, mixture_stats, open_source, total_lanes
from jaxllm.data import mixture as mixture_lib


class IdTokenizer:
    """Documents are space-separated token ids, so a token says which source it came from."""
    bos_id, eos_id = 1, 2

    def encode(self, text, add_bos=False, add_eos=False):
        return [1] * add_bos + [int(x) for x in text.split()] + [2] * add_eos


def docs_of(token: int, n: int, length: int) -> list[str]:
    """n documents of `length` tokens each once bos and eos are added."""
    return [" ".join([str(token)] * (length - 2))] * n


def varied_docs(lo: int, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(str(t) for t in rng.integers(lo, lo + 100, size=rng.integers(1, 60))) for _ in range(n)]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def two_sources(mix="documents", **kw):
    return Mixture((Component("a", docs_of(10, 50, 10), 0.75, **kw), Component("b", docs_of(20, 20, 20), 0.25)),
                   mix=mix)


# ------------------------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("mix", ["documents", "rows"])
def test_epoch_counts_equal_hand_computed_values(mix):
    # 100 steps x 4 rows x 32 tokens = 12,800 tokens: a gets 0.75 of them = 9,600 = 960 documents of 10
    # tokens = 19.2 epochs of its 50; b gets 3,200 = 160 documents of 20 = 8 epochs of its 20.
    m = two_sources(mix)
    it = lm_pipeline(m, IdTokenizer(), seq_len=32, batch_size=4, seed=0)
    batches = take(it, 100)
    stats = mixture_stats(m, it.get_state(), total_lanes(4, 1))
    assert stats["data/a/tokens"] == 9600 and stats["data/b/tokens"] == 3200
    # Documents mode counts whole documents taken; rows mode may have started one more per lane.
    assert stats["data/a/epochs"] == pytest.approx(19.2, abs=4 / 50)
    assert stats["data/b/epochs"] == pytest.approx(8.0, abs=4 / 20)
    tokens = np.stack([b["tokens"] for b in batches])
    assert (tokens == 10).sum() == pytest.approx(9600 * 8 / 10, abs=4 * 10)   # 8 body tokens per 10
    assert (tokens == 20).sum() == pytest.approx(3200 * 18 / 20, abs=4 * 20)


@pytest.mark.parametrize("mix", ["documents", "rows"])
def test_shares_converge_to_weights_on_documents_of_random_lengths(mix):
    weights = (0.5, 0.3, 0.2)
    m = Mixture(tuple(Component(n, varied_docs(100 * (i + 1), 200, i), w)
                      for i, (n, w) in enumerate(zip("xyz", weights))), mix=mix)
    it = lm_pipeline(m, IdTokenizer(), seq_len=64, batch_size=8, seed=3)
    body = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in take(it, 200)])
    body = body[body >= 100]
    shares = [np.mean((body >= 100 * (i + 1)) & (body < 100 * (i + 2))) for i in range(3)]
    # Shares are of all tokens incl. bos/eos; body tokens follow them to within the length noise.
    np.testing.assert_allclose(shares, weights, atol=0.02)
    stats = mixture_stats(m, it.get_state(), total_lanes(8, 1))
    total = sum(stats[f"data/{n}/tokens"] for n in "xyz")
    np.testing.assert_allclose([stats[f"data/{n}/tokens"] / total for n in "xyz"], weights, atol=0.01)


def test_weight_schedule_switches_at_the_step():
    m = Mixture((Component("a", docs_of(10, 30, 8), 1.0), Component("b", docs_of(20, 30, 8), 0.0)), mix="rows",
                schedule=((0, (1.0, 0.0)), (5, (0.0, 1.0))))
    batches = take(lm_pipeline(m, IdTokenizer(), seq_len=16, batch_size=2, seed=0), 10)
    for step, b in enumerate(batches):
        body = b["tokens"][b["tokens"] > 2]
        assert set(body.tolist()) == ({10} if step < 5 else {20}), step


def test_stop_source_is_read_once_and_the_rest_take_over():
    stop = Component("once", [f"{100 + i} {100 + i}" for i in range(8)], 0.5, exhaustion="stop")
    m = Mixture((stop, Component("loop", docs_of(20, 5, 6), 0.5)))
    it = lm_pipeline(m, IdTokenizer(), seq_len=8, batch_size=2, seed=0)
    seen = np.concatenate([b["tokens"].ravel() for b in take(it, 40)])
    once = seen[seen >= 100]
    assert sorted(set(once.tolist())) == list(range(100, 108)) and len(once) == 16   # each document exactly once
    assert mixture_stats(m, it.get_state(), 2)["data/once/epochs"] == 1.0
    only_stop = Mixture((stop,))
    assert len(list(lm_pipeline(only_stop, IdTokenizer(), seq_len=8, batch_size=2, seed=0))) <= 4   # it ends


def test_overlong_documents_are_skipped_and_counted():
    m = Mixture((Component("a", ["3 3", "4 " * 50, "5 5"], 1.0),))
    it = lm_pipeline(m, IdTokenizer(), seq_len=8, batch_size=1, seed=0, max_doc_chars=20)
    seen = np.concatenate([b["tokens"].ravel() for b in take(it, 6)])
    assert 4 not in seen and 3 in seen
    assert mixture_stats(m, it.get_state(), 1)["data/a/skipped"] >= 1


# --------------------------------------------------------------------------------- determinism, resume

def test_same_seed_same_batches_other_seed_differs():
    kw = dict(seq_len=32, batch_size=4)
    m = Mixture((Component("x", varied_docs(100, 60, 0), 0.6), Component("y", varied_docs(200, 60, 1), 0.4)))
    a = take(lm_pipeline(m, IdTokenizer(), seed=5, **kw), 8)
    assert_same(a, take(lm_pipeline(m, IdTokenizer(), seed=5, **kw), 8))
    assert not np.array_equal(a[0]["tokens"], take(lm_pipeline(m, IdTokenizer(), seed=6, **kw), 1)[0]["tokens"])


@pytest.mark.parametrize("mix", ["documents", "rows"])
def test_resume_mid_epoch_continues_exactly(mix):
    m = Mixture((Component("x", varied_docs(100, 40, 0), 0.7), Component("y", varied_docs(200, 5, 1), 0.3)),
                mix=mix, schedule=((0, (0.7, 0.3)), (12, (0.2, 0.8))))
    kw = dict(seq_len=32, batch_size=3, seed=1)
    it = lm_pipeline(m, IdTokenizer(), **kw)
    take(it, 9)
    state = json.loads(json.dumps(it.get_state()))          # what the checkpoint stores
    stats = mixture_stats(m, state, 3)
    assert 0 < stats["data/x/epochs"] < 1 < stats["data/y/epochs"]   # mid-epoch for x, y already repeated
    expected = take(it, 12)                                  # crosses the weight switch at step 12
    resumed = lm_pipeline(m, IdTokenizer(), **kw)
    resumed.set_state(state)
    assert_same(take(resumed, 12), expected)


def test_one_and_two_processes_see_the_same_global_batches():
    m = Mixture((Component("x", varied_docs(100, 33, 0), 0.5), Component("y", varied_docs(200, 17, 1), 0.5)))
    kw = dict(seq_len=16, seed=2)
    single = take(lm_pipeline(m, IdTokenizer(), batch_size=4, **kw), 15)
    halves = [take(lm_pipeline(m, IdTokenizer(), batch_size=2, process_index=p, process_count=2, **kw), 15)
              for p in range(2)]
    joined = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves)]
    assert_same(single, joined)


def test_worker_processes_give_the_same_batches():
    m = Mixture((Component("x", varied_docs(100, 33, 0), 0.5), Component("y", varied_docs(200, 17, 1), 0.5)))
    kw = dict(seq_len=16, seed=2, batch_size=4)
    one = lm_pipeline(m, IdTokenizer(), **kw)
    inline = take(one, 6)
    it = lm_pipeline(m, IdTokenizer(), workers=2, **kw)
    try:
        assert_same(take(it, 6), inline)
        # Read from the workers' states; documents mode counts the documents handed to the packer.
        stats = mixture_stats(m, it.get_state(), 4)
        assert stats == mixture_stats(m, one.get_state(), 4)
        assert stats["data/x/tokens"] + stats["data/y/tokens"] == pytest.approx(6 * 4 * 16, abs=4 * 61)
    finally:
        it.close()


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, message", [
    (dict(weights=(1.0, -0.5)), r"weight of source 'b.txt' is negative"),
    (dict(weights=(0.0, 0)), "all weights are zero"),
    (dict(weights=(1.0,)), r"1 entries but data.sources has 2 \('a.txt', 'b.txt'\)"),
    (dict(weights=(1, 1), exhaustion=("repeat", "never")), r"exhaustion of source 'b.txt'"),
    (dict(weights=(1, 1), weight_schedule=((0, (1, 1)), (10, (1, -1)))), r"weight_schedule\[1\].*'b.txt' is negative"),
    (dict(weights=(1, 1), mix="tokens"), "data.mix must be"),
])
def test_bad_weights_are_config_errors_naming_the_source(kw, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(sources=("a.txt", "b.txt"), **kw).validate()


def test_bad_jsonl_lines_raise_with_file_line_or_are_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\nnot json\n{"body": "x"}\n{"text": "two"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: invalid JSON"):
        open_source(str(path))
    source = open_source(str(path), on_error="skip")
    assert source.records == ["one", "two"] and source.skipped == {"bad_json": 1, "missing_field": 1}


# ------------------------------------------------------------------------- formats and the whole run

def test_component_names_are_short_and_unique():
    taken = []
    for spec in ["builtin:pydoc", "/d/wiki.jsonl", "/e/wiki.jsonl", "tfds:my_ds:train", "corpus/"]:
        taken.append(mixture_lib.component_name(spec, taken))
    assert taken == ["pydoc", "wiki", "wiki_2", "my_ds_train", "corpus"]


def test_parquet_and_array_record_text_sources(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    from array_record.python import array_record_module
    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    src = open_source(str(tmp_path / "a.parquet"))
    assert src.records == ["alpha", "beta"] and src.skipped == {"null": 1}
    with pytest.raises(ValueError, match=r"a\.parquet: column 'body' missing"):
        open_source(str(tmp_path / "a.parquet"), jsonl_field="body")
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "t.array_record"), "group_size:1")
    for text in ["第一篇文档", "second document"]:
        writer.write(text.encode("utf-8"))
    writer.close()
    src = open_source(str(tmp_path))   # a directory of mixed formats, sorted: a.parquet, t.array_record
    assert [src.records[i] for i in range(len(src))] == ["alpha", "beta", "第一篇文档", "second document"]


def _write_tfds(data_dir) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxllmTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"text": f"The {i}th document of a locally written TFDS dataset. 第{i}篇。"}

    JaxllmTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_and_text_mixture_trains_and_logs_per_source_stats(tmp_path, english_corpus, tokenizer_path,
                                                                monkeypatch):
    _write_tfds(tmp_path / "tfds")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    from jaxllm.config import Config, ModelConfig, OptimConfig, TrainConfig
    from jaxllm.metrics import read_metrics
    from jaxllm.trainer import train
    cfg = Config(model=ModelConfig.preset("tiny", vocab_size=0, max_seq_len=64),
                 # english_corpus is one paragraph per line: "line" makes those paragraphs the documents counted
                 data=DataConfig(sources=("tfds:jaxllm_tiny_text:train", str(english_corpus)), weights=(0.3, 0.7),
                                 seq_len=64, eval_fraction=0.05, text_split="line"),
                 optim=OptimConfig(warmup_steps=1), workdir=str(tmp_path / "run"), tokenizer=tokenizer_path,
                 train=TrainConfig(steps=4, batch_size=4, log_every=2, eval_every=0, eval_batches=1, save_every=0,
                                   async_checkpointing=False)).validate()
    train(cfg)
    rows = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "train/loss" in r]
    last = rows[-1]
    tokens = {k: v for k, v in last.items() if k.endswith("/tokens") and k.startswith("data/")}
    assert set(tokens) == {"data/jaxllm_tiny_text_train/tokens", "data/pydoc/tokens"}
    assert sum(tokens.values()) == pytest.approx(4 * 4 * 64, abs=4 * 64)   # documents taken by the packer
    assert tokens["data/jaxllm_tiny_text_train/tokens"] / sum(tokens.values()) == pytest.approx(0.3, abs=0.1)
    assert last["data/jaxllm_tiny_text_train/epochs"] > 0
