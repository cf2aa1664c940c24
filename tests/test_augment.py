"""augment: each op (seeded, names and numbers kept, never empty), synonyms, label actions, outputs."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import spacy
import yaml

from stages import augment as au
from stages import paths
from stages.common import StageError
from stages.params import parse_section
from stages.reviews import COLUMNS
from tests.pipeline_fixture import AG_NEWS_LABELS as LABEL_NAMES

TEXTS = (
    "Intel unveils a faster chip for laptops, shares rise 5% in New York trading.",
    "The home side won the final in Geneva after a tense match on Sunday.",
    "Oil prices climb as investors weigh the quarterly earnings of big companies.",
    "Rebels attack a convoy near the border, the minister says.",
)
SYNONYMS = {
    "faster": ["quicker", "speedier"],
    "chip": ["processor"],
    "shares": ["stocks"],
    "won": ["captured"],
    "final": ["decider"],
    "match": ["game", "contest"],
    "prices": ["costs"],
    "investors": ["traders"],
    "attack": ["ambush", "raid"],
    "convoy": ["column"],
}
ALL_OPS = {
    "synonym": {"enabled": True, "rate": 0.3},
    "swap": {"enabled": True, "rate": 0.3},
    "delete": {"enabled": True, "rate": 0.3},
    "insert": {"enabled": True, "rate": 0.3},
}
NLP = spacy.blank("en")


def tokens_of(text: str) -> tuple[list[str], list[bool]]:
    doc = NLP(text)
    return [t.text for t in doc], [bool(t.whitespace_) for t in doc]


def frames(texts=TEXTS) -> tuple[pl.DataFrame, pl.DataFrame]:
    """clean.parquet and tokens.parquet for `texts` as train rows plus two test rows."""
    rows = [(f"tr{i}", "train", i % 4, t) for i, t in enumerate(texts)]
    rows += [("te0", "test", 1, "Fans gather for the final."), ("te1", "test", 0, "Talks go on.")]
    clean = pl.DataFrame(rows, schema=["id", "split", "label", "text"], orient="row")
    toks = [tokens_of(t) for t in clean["text"]]
    tokens = pl.DataFrame(
        {"id": clean["id"], "tokens": [t for t, _ in toks], "whitespace": [w for _, w in toks]}
    )
    return clean, tokens


def protected(tokens: list[str]) -> Counter:
    """Everything an op must leave alone: names, numbers, punctuation."""
    return Counter(t for t in tokens if not au.is_word(t))


@pytest.mark.parametrize("op", au.OPS)
def test_op_is_seeded_keeps_protected_tokens_and_never_empties(op: str) -> None:
    fn = au.OP_FUNCS[op]
    changed = 0
    for text in TEXTS:
        tokens, spaces = tokens_of(text)
        first = fn(tokens, spaces, 0.3, random.Random(f"7:{text}"), SYNONYMS)
        again = fn(tokens, spaces, 0.3, random.Random(f"7:{text}"), SYNONYMS)
        assert first == again  # same seed, same result
        assert first is not None
        new_tokens, new_spaces = first
        assert len(new_tokens) == len(new_spaces)
        out = au.detokenise(new_tokens, new_spaces)
        assert out.strip()
        # Names, numbers and punctuation are kept as they were, none is added.
        assert protected(new_tokens) == protected(tokens)
        # Every new word is a lowercase word (inserted or replaced ones come from the lexicon).
        for word in Counter(new_tokens) - Counter(tokens):
            assert au.is_word(word)
        changed += out != text
        # The original list is not modified in place.
        assert au.detokenise(tokens, spaces) == text
    assert changed == len(TEXTS)


def test_different_seeds_give_different_rows() -> None:
    tokens, spaces = tokens_of(TEXTS[0])
    outs = {
        au.detokenise(*au.op_swap(tokens, spaces, 0.3, random.Random(seed), SYNONYMS))
        for seed in range(10)
    }
    assert len(outs) > 1


def test_ops_give_up_when_nothing_is_eligible() -> None:
    tokens, spaces = tokens_of("Apple Inc. 2004 Q3 : IBM , HP .")
    for op in au.OPS:
        assert au.OP_FUNCS[op](tokens, spaces, 0.5, random.Random(0), SYNONYMS) is None


def test_delete_joins_punctuation_and_keeps_a_word() -> None:
    tokens, spaces = tokens_of("Stocks fell, traders said.")
    out = au.op_delete(tokens, spaces, 1.0, random.Random(0), {})
    text = au.detokenise(*out)
    assert sum(au.is_word(t) for t in out[0]) == 1  # two words, at most all but one deleted
    assert " ," not in text and " ." not in text
    assert text.startswith("Stocks")


def test_only_free_standing_words_are_touched() -> None:
    tokens, spaces = tokens_of("A band of ultra-cynics is seeing green again, well-timed.")
    assert [tokens[i] for i in au.free_words(tokens, spaces)] == [
        "band",
        "of",
        "is",
        "seeing",
        "green",
        "again",
    ]
    for seed in range(20):
        out = au.detokenise(*au.op_delete(tokens, spaces, 0.5, random.Random(seed), {}))
        assert "ultra-cynics" in out and "well-timed" in out


def test_detokenise_rebuilds_spacy_text() -> None:
    for text in TEXTS:
        assert au.detokenise(*tokens_of(text)) == text


def test_build_synonyms_skips_forms_of_the_word_and_weak_neighbours() -> None:
    vocab = ["[PAD]", "company", "companies", "firm", "##s", "Firm", "the", "banana", "business"]
    table = np.array(
        [
            [0, 0, 1],  # [PAD]
            [1, 0.1, 0],  # company
            [1, 0.12, 0],  # companies: closest, but the same word
            [1, 0.3, 0],  # firm
            [1, 0.1, 0],  # ##s: a word piece
            [1, 0.1, 0],  # Firm: capitalised
            [1, 0.1, 0],  # the: stop word
            [0, 1, 0.2],  # banana: far
            [1, 0.5, 0],  # business
        ],
        dtype=np.float32,
    )
    got = au.build_synonyms({"company", "notinvocab"}, vocab, table, top_k=5, min_similarity=0.5)
    assert got == {"company": ["firm", "business"]}
    assert au.build_synonyms({"company"}, vocab, table, top_k=1, min_similarity=0.5) == {
        "company": ["firm"]
    }


def test_synonyms_from_a_model_folder(tiny_bert_dir: Path) -> None:
    vocab, table = au.load_embedding_table(str(tiny_bert_dir))
    assert table.shape == (len(vocab), 32)
    got = au.build_synonyms({"market", "shares", "game"}, vocab, table, 3, -1.0)
    assert set(got) == {"market", "shares", "game"}
    for word, neighbours in got.items():
        assert len(neighbours) == 3
        assert all(au.is_word(n) and n != word for n in neighbours)


def test_load_embedding_table_needs_a_bert_folder(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="tokenizer.json not found"):
        au.load_embedding_table(str(tmp_path))


def test_apply_label_actions() -> None:
    clean, _ = frames()
    train = clean.filter(pl.col("split") == "train")
    issues = pl.DataFrame(
        {
            "id": ["tr0", "tr1", "tr2", "tr3"],
            "action": ["none", "dropped", "relabelled", "flagged"],
            "suggested_label": [0, 0, 3, 0],
        }
    )
    out = au.apply_label_actions(train, issues)
    assert out["id"].to_list() == ["tr0", "tr2", "tr3"]
    assert out["label"].to_list() == [0, 3, 3]  # tr2 relabelled to 3; flagged tr3 keeps its 3
    with pytest.raises(StageError, match="1 train row\\(s\\) not scored \\(first id tr3\\)"):
        au.apply_label_actions(train, issues.filter(pl.col("id") != "tr3"))


def issues_for(clean: pl.DataFrame, **actions: str) -> pl.DataFrame:
    train = clean.filter(pl.col("split") == "train")
    return train.select(
        "id",
        action=pl.col("id").replace_strict(actions, default="none"),
        suggested_label=pl.lit(0, dtype=pl.Int64),
    )


PARAMS = {
    "reviews": "data/reviews/labels.csv",
    "n_aug": 3,
    "seed": 42,
    "ops": ALL_OPS,
    "synonym_model": "set-by-test",
    "synonym_top_k": 3,
    "synonym_min_similarity": 0.0,
}


def augment_params(raw: dict) -> au.AugmentParams:
    return parse_section(raw, au.AugmentParams, "augment")


def test_run_augments_train_only_and_keeps_sources(tiny_bert_dir: Path) -> None:
    clean, tokens = frames()
    params = augment_params({**PARAMS, "synonym_model": str(tiny_bert_dir)})
    train, test, report = au.run(
        clean, tokens, issues_for(clean, tr1="dropped"), params, LABEL_NAMES
    )
    # Test rows pass through untouched.
    expected_test = clean.filter(pl.col("split") == "test").select("id", "split", "label", "text")
    assert test.select("id", "split", "label", "text").equals(expected_test)
    assert test["op"].unique().to_list() == ["original"]
    assert test["augmented_from"].null_count() == test.height
    assert list(train.columns) == list(au.OUT_COLUMNS)
    originals = train.filter(pl.col("op") == "original")
    assert originals["id"].to_list() == ["tr0", "tr2", "tr3"]  # tr1 was dropped
    added = train.filter(pl.col("op") != "original")
    assert added.height == report["added"] > 0
    assert set(added["augmented_from"].to_list()) <= {"tr0", "tr2", "tr3"}
    assert set(added["op"].to_list()) <= set(au.OPS)
    source = dict(originals.select("id", "label").iter_rows())
    source_text = dict(originals.select("id", "text").iter_rows())
    for row in added.iter_rows(named=True):
        assert row["label"] == source[row["augmented_from"]]
        assert row["text"].strip() and row["text"] != source_text[row["augmented_from"]]
    assert train["id"].is_unique().all()
    assert report["train_rows_in"] == 4 and report["dropped_by_label_issues"] == 1
    assert report["train_rows_out"] == train.height
    assert sum(v["added"] for v in report["ops"].values()) == added.height
    assert sum(v["added"] + v["skipped"] for v in report["ops"].values()) == 3 * 3
    again, _, _ = au.run(clean, tokens, issues_for(clean, tr1="dropped"), params, LABEL_NAMES)
    assert again.equals(train)  # seeded


def test_run_without_augmentation_and_with_relabel() -> None:
    clean, tokens = frames()
    params = augment_params({**PARAMS, "n_aug": 0})
    train, _, report = au.run(
        clean, tokens, issues_for(clean, tr3="relabelled"), params, LABEL_NAMES
    )
    assert train["op"].unique().to_list() == ["original"]
    assert train.filter(pl.col("id") == "tr3")["label"].to_list() == [0]
    assert report["relabelled_by_label_issues"] == 1
    assert report["added"] == 0 and report["synonym_lexicon_words"] == 0


def test_swap_and_delete_need_no_synonym_model() -> None:
    clean, tokens = frames()
    ops = {
        **ALL_OPS,
        "synonym": {"enabled": False, "rate": 0.1},
        "insert": {"enabled": False, "rate": 0.1},
    }
    params = augment_params({**PARAMS, "ops": ops, "synonym_model": "/nonexistent"})
    train, _, report = au.run(clean, tokens, issues_for(clean), params, LABEL_NAMES)
    assert set(report["ops"]) == {"swap", "delete"}
    assert set(train["op"].to_list()) <= {"original", "swap", "delete"}


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ({"shuffle": {"enabled": True, "rate": 0.1}}, "unknown key(s) augment.ops.shuffle"),
        ({"swap": {"enabled": True, "rate": 0.0}}, "augment.ops.swap.rate=0.0 (must be in (0, 1])"),
        (
            {"delete": {"enabled": True, "rate": 1.5}},
            "augment.ops.delete.rate=1.5 (must be in (0, 1])",
        ),
        ({"swap": {"enabled": "yes", "rate": 0.1}}, "augment.ops.swap.enabled: expected bool"),
    ],
)
def test_bad_ops_are_clear_errors(ops: dict, message: str) -> None:
    with pytest.raises(StageError) as err:
        au.enabled_ops(augment_params({**PARAMS, "ops": {**ALL_OPS, **ops}}).ops)
    assert message in str(err.value)


def test_stale_tokens_are_a_clear_error() -> None:
    clean, tokens = frames()
    stale = tokens.with_columns(
        tokens=pl.when(pl.col("id") == "tr2")
        .then(pl.lit(["Other", "text"]))
        .otherwise(pl.col("tokens")),
        whitespace=pl.when(pl.col("id") == "tr2")
        .then(pl.lit([True, False]))
        .otherwise(pl.col("whitespace")),
    )
    with pytest.raises(StageError, match="id tr2: tokens do not rebuild the clean text"):
        au.run(
            clean,
            stale,
            issues_for(clean),
            augment_params({**PARAMS, "synonym_model": "/x"}),
            LABEL_NAMES,
        )
    with pytest.raises(StageError, match="missing column\\(s\\) \\['whitespace'\\]"):
        au.run(
            clean, tokens.drop("whitespace"), issues_for(clean), augment_params(PARAMS), LABEL_NAMES
        )


def test_main_writes_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path
) -> None:
    clean, tokens = frames()
    params = {
        "labels": ["World", "Sports", "Business", "Sci/Tech"],
        "augment": {**PARAMS, "synonym_model": str(tiny_bert_dir)},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    interim = tmp_path / "data" / "interim"
    interim.mkdir(parents=True)
    clean.write_parquet(interim / "clean.parquet")
    tokens.write_parquet(interim / "tokens.parquet")
    issues_for(clean).write_parquet(interim / "label_issues.parquet")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match="data/reviews/labels.csv"):
        au.main()  # the reviews file is a declared input: its absence is named, not ignored
    (tmp_path / "data" / "reviews").mkdir()
    (tmp_path / "data" / "reviews" / "labels.csv").write_text(",".join(COLUMNS) + "\n")
    au.main()
    train = pl.read_parquet(paths.TRAIN)
    test = pl.read_parquet(paths.TEST)
    report = json.loads(paths.AUGMENT_REPORT.read_text())
    assert train.height == report["train_rows_out"] and test.height == report["test_rows"] == 2
    first = paths.TRAIN.read_bytes()
    au.main()
    assert paths.TRAIN.read_bytes() == first  # byte-identical on a rerun


def test_people_decisions_override_label_issues_and_stale_ones_are_reported() -> None:
    """A reviewer's keep brings back a row label_issues dropped, relabel and drop decide their
    rows, skip leaves the automatic action; a decision on a changed text is never applied."""
    from stages import reviews as rv

    clean, tokens = frames((*TEXTS, "Markets close higher after a quiet week of trading."))
    train = clean.filter(pl.col("split") == "train")
    text = dict(train.select("id", "text").iter_rows())
    given = dict(train.select("id", "label").iter_rows())
    name = dict(enumerate(LABEL_NAMES))
    decided = {
        "tr1": rv.make_review("tr1", text["tr1"], "keep", name[given["tr1"]], LABEL_NAMES, "ana"),
        "tr0": rv.make_review(
            "tr0", text["tr0"], "relabel", name[given["tr0"]], LABEL_NAMES, "ana", "Sci/Tech"
        ),
        "tr2": rv.make_review("tr2", text["tr2"], "drop", name[given["tr2"]], LABEL_NAMES, "ana"),
        "tr3": rv.make_review(
            "tr3", "a text since edited", "drop", name[given["tr3"]], LABEL_NAMES, "ana"
        ),
        "gone:1": rv.make_review("gone:1", "x", "skip", "World", LABEL_NAMES, "ana"),
        # Kept when it had another label: the label was fixed in the data since, so the keep
        # must not bring the old one back.
        "tr4": rv.make_review(
            "tr4", text["tr4"], "keep", name[(given["tr4"] + 1) % 4], LABEL_NAMES, "ana"
        ),
    }
    params = augment_params({**PARAMS, "n_aug": 0})
    out, _, report = au.run(
        clean,
        tokens,
        issues_for(clean, tr1="dropped", tr3="relabelled"),
        params,
        LABEL_NAMES,
        rv.reviews_table(decided, LABEL_NAMES),
    )
    labels = dict(out.select("id", "label").iter_rows())
    assert sorted(labels) == ["tr0", "tr1", "tr3", "tr4"]  # tr1 kept by a person, tr2 dropped
    assert labels["tr1"] == given["tr1"]
    assert labels["tr0"] == LABEL_NAMES.index("Sci/Tech")
    assert labels["tr3"] == 0  # its decision is stale: label_issues' relabel applies
    assert labels["tr4"] == given["tr4"]  # its label as the data has it now
    # What validation scores against where a person decided (null elsewhere).
    reviewed = dict(out.select("id", "reviewed_label").iter_rows())
    assert reviewed == {
        "tr0": LABEL_NAMES.index("Sci/Tech"),
        "tr1": given["tr1"],
        "tr3": None,
        "tr4": None,
    }
    r = report["reviews"]
    assert (r["decisions"], r["applied"], r["keep"], r["relabel"], r["drop"]) == (6, 3, 1, 1, 1)
    assert r["stale"] == {
        "count": 3,
        "row_missing": ["gone:1"],
        "text_changed": ["tr3"],
        "label_changed": ["tr4"],
    }
    assert r["labels_changed"] == int(given["tr0"] != LABEL_NAMES.index("Sci/Tech"))
    # What label_issues alone would have done stays reported beside it.
    assert report["dropped_by_label_issues"] == 1 and report["train_rows_kept"] == 4
