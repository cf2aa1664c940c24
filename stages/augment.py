"""Stage `augment`: apply the label-issue actions, then add seeded, offline augmentations of train rows.

Operations work on the spaCy tokens of `tokenize` and touch only lowercase alphabetic words:
capitalised words (names), numbers, punctuation and the label are never replaced, and no such token
is ever invented. Synonyms come from an offline source: nearest neighbours in the input (word-piece)
embedding table of a local BERT-style model, restricted to lowercase alphabetic whole-word entries
(not stop words, not inflections of the word itself). Test rows pass through untouched.

Outputs the tables that `train` and `evaluate` read: data/processed/{train,test}.parquet with
id, split, label, text, augmented_from (source id, null for original rows) and op.
"""

from __future__ import annotations

import random
from os.path import commonprefix
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from spacy.lang.en.stop_words import STOP_WORDS
from tqdm import tqdm

from stages import paths
from stages.common import (
    StageError,
    check_contract,
    get_logger,
    load_labels,
    read_table,
    require_file,
    run_main,
    write_json,
    write_table,
)
from stages.modeling import resolve_base_model
from stages.params import load_section
from stages.reviews import DECISIONS, read_reviews, reviews_table, stale_reviews
from stages.sections import AugmentParams, OpsParams

# Stale decisions' ids listed in reports/augment.json (the count is always whole).
STALE_IDS_LISTED = 20

OPS: tuple[str, ...] = ("synonym", "swap", "delete", "insert")
# `given_label`: the label as ingested, before `label_issues.action` relabelled it;
# `reviewed_label`: the label a person kept or chose (the reviews file), null where nobody did.
# Validation scores against the reviewed label, else the given one: recipes with and without
# automatic relabelling are judged on the same labels, and never against a label a person rejected.
OUT_COLUMNS: tuple[str, ...] = (
    "id",
    "split",
    "label",
    "text",
    "augmented_from",
    "op",
    "given_label",
    "reviewed_label",
)
# Two words sharing this many leading letters are taken as forms of one word (company/companies),
# which would add no new vocabulary.
SAME_STEM_PREFIX = 4
SIMILARITY_CHUNK = 2048  # query words per matrix product: bounds memory at ~170 MB for 21k entries

log = get_logger("augment")

Tokens = list[str]
Spaces = list[bool]


def is_word(token: str) -> bool:
    """A token the ops may touch: lowercase ASCII letters only (so no name, number or symbol)."""
    return token.isascii() and token.isalpha() and token.islower()


def free_words(tokens: Tokens, spaces: Spaces) -> list[int]:
    """Positions of words that stand on their own: a space (or the start) before them, and a space
    or punctuation after them. Parts of "ultra-cynics" or "well-timed" are not free: deleting or
    moving them would leave "of-cynics"."""
    free = []
    for i, tok in enumerate(tokens):
        if not is_word(tok) or (i > 0 and not spaces[i - 1]):
            continue
        after = tokens[i + 1] if i + 1 < len(tokens) and not spaces[i] else None
        if after is None or (not after[0].isalnum() and after[0] not in "-'\u2019"):
            free.append(i)
    return free


def detokenise(tokens: Tokens, spaces: Spaces) -> str:
    """spaCy's own inverse: each token followed by its trailing space, if it had one."""
    return "".join(t + " " if s else t for t, s in zip(tokens, spaces, strict=True)).strip()


def _candidate_vocab(vocab: list[str]) -> list[int]:
    return [i for i, t in enumerate(vocab) if is_word(t) and len(t) >= 3 and t not in STOP_WORDS]


def build_synonyms(
    words: set[str],
    vocab: list[str],
    table: np.ndarray,
    top_k: int,
    min_similarity: float,
) -> dict[str, list[str]]:
    """Up to `top_k` neighbours (cosine in `table`, one row per `vocab` entry) for each of `words`
    that is itself a whole-word vocabulary entry; forms of the same word are skipped."""
    candidates = _candidate_vocab(vocab)
    cand_words = [vocab[i] for i in candidates]
    index = {w: j for j, w in enumerate(cand_words)}
    matrix = table[candidates].astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True).clip(min=1e-12)
    queries = sorted(w for w in words if w in index)
    synonyms: dict[str, list[str]] = {}
    for start in range(0, len(queries), SIMILARITY_CHUNK):
        chunk = queries[start : start + SIMILARITY_CHUNK]
        sims = matrix[[index[w] for w in chunk]] @ matrix.T
        # Looking a little further than top_k leaves room for the neighbours filtered out below.
        depth = min(top_k * 4 + 1, sims.shape[1])
        nearest = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
        for row, word in enumerate(chunk):
            order = nearest[row][np.argsort(-sims[row, nearest[row]], kind="stable")]
            chosen = []
            for j in order:
                other = cand_words[j]
                if sims[row, j] < min_similarity or len(chosen) == top_k:
                    break
                if other in word or word in other:
                    continue
                if len(commonprefix([word, other])) >= SAME_STEM_PREFIX:
                    continue
                chosen.append(other)
            if chosen:
                synonyms[word] = chosen
    return synonyms


def load_embedding_table(model_dir: str) -> tuple[list[str], np.ndarray]:
    """The vocabulary (by token id) and input embedding matrix of a local BERT-style model."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    folder = Path(model_dir)
    for name in ("tokenizer.json", "model.safetensors"):
        if not (folder / name).exists():
            raise StageError(
                f"augment.synonym_model: {folder / name} not found (need a local model)"
            )
    by_id = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    vocab = [""] * (max(by_id.values()) + 1)
    for token, idx in by_id.items():
        vocab[idx] = token
    weights_file = folder / "model.safetensors"
    with safe_open(str(weights_file), framework="np") as f:
        keys = [k for k in f.keys() if k.endswith("word_embeddings.weight")]  # noqa: SIM118
        if len(keys) != 1:
            raise StageError(f"{weights_file}: expected one word_embeddings.weight, found {keys}")
        table = f.get_tensor(keys[0])
    if table.shape[0] < len(vocab):
        raise StageError(f"{weights_file}: {table.shape[0]} embeddings for {len(vocab)} tokens")
    return vocab, table[: len(vocab)]


def op_synonym(
    tokens: Tokens, spaces: Spaces, rate: float, rng: random.Random, synonyms: dict
) -> tuple[Tokens, Spaces] | None:
    """Replace round(rate * n) (at least 1) words that have synonyms by one of them."""
    slots = [i for i in free_words(tokens, spaces) if tokens[i] in synonyms]
    if not slots:
        return None
    tokens = list(tokens)
    for i in rng.sample(slots, max(1, min(len(slots), round(rate * len(slots))))):
        tokens[i] = rng.choice(synonyms[tokens[i]])
    return tokens, list(spaces)


def op_swap(
    tokens: Tokens, spaces: Spaces, rate: float, rng: random.Random, synonyms: dict
) -> tuple[Tokens, Spaces] | None:
    """Swap two lowercase words, round(rate * n) times (at least once); spaces stay in place."""
    slots = free_words(tokens, spaces)
    if len(set(tokens[i] for i in slots)) < 2:
        return None
    tokens = list(tokens)
    for _ in range(max(1, round(rate * len(slots)))):
        a, b = rng.sample(slots, 2)
        tokens[a], tokens[b] = tokens[b], tokens[a]
    return tokens, list(spaces)


def op_delete(
    tokens: Tokens, spaces: Spaces, rate: float, rng: random.Random, synonyms: dict
) -> tuple[Tokens, Spaces] | None:
    """Delete round(rate * n) lowercase words (at least 1), keeping at least one word."""
    slots = free_words(tokens, spaces)
    if len(slots) < 2:
        return None
    doomed = set(rng.sample(slots, max(1, min(len(slots) - 1, round(rate * len(slots))))))
    out_tokens: Tokens = []
    out_spaces: Spaces = []
    for i, (tok, space) in enumerate(zip(tokens, spaces, strict=True)):
        if i in doomed:
            # The deleted word's trailing space decides what follows the previous token:
            # "the cat, sat" minus "cat" is "the, sat", not "the , sat".
            if out_spaces:
                out_spaces[-1] = space
            continue
        out_tokens.append(tok)
        out_spaces.append(space)
    return out_tokens, out_spaces


def op_insert(
    tokens: Tokens, spaces: Spaces, rate: float, rng: random.Random, synonyms: dict
) -> tuple[Tokens, Spaces] | None:
    """Insert a synonym of one of the row's words before another lowercase word that follows a
    space, round(rate * n) times (at least once)."""
    sources = [tokens[i] for i in free_words(tokens, spaces) if tokens[i] in synonyms]
    n_words = len(free_words(tokens, spaces))
    if not sources:
        return None
    tokens, spaces = list(tokens), list(spaces)
    for _ in range(max(1, round(rate * n_words))):
        slots = [i for i in free_words(tokens, spaces) if i > 0]
        if not slots:
            return None
        at = rng.choice(slots)
        tokens.insert(at, rng.choice(synonyms[rng.choice(sources)]))
        spaces.insert(at, True)
    return tokens, spaces


OP_FUNCS = {"synonym": op_synonym, "swap": op_swap, "delete": op_delete, "insert": op_insert}


def enabled_ops(ops: OpsParams) -> dict[str, float]:
    """{op: rate} for the ops switched on in params, in OPS order."""
    return {name: op.rate for name in OPS if (op := getattr(ops, name)).enabled}


def apply_label_actions(
    train: pl.DataFrame, issues: pl.DataFrame, reviews: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Train rows after `label_issues` and people's decisions: dropped rows removed, relabelled
    rows given the new label. `reviews` (`stages.reviews.reviews_table`, already cleared of stale
    decisions by `applicable_reviews`): a keep, relabel or drop decides its row whatever
    `label_issues.action` did (a kept row comes back, with the label the reviewer confirmed);
    skip leaves the automatic action. `reviewed_label`: the label a person kept or chose."""
    missing = {"id", "action", "suggested_label"} - set(issues.columns)
    if missing:
        raise StageError(f"{paths.LABEL_ISSUES}: missing column(s) {sorted(missing)}")
    joined = train.join(
        issues.select("id", "action", "suggested_label"), on="id", how="left", maintain_order="left"
    )
    unscored = joined.filter(pl.col("action").is_null())
    if unscored.height:
        raise StageError(
            f"{paths.LABEL_ISSUES}: {unscored.height} train row(s) not scored (first id "
            f"{unscored['id'][0]}); it is stale: rerun `dvc repro label_issues`"
        )
    decided = (reviews if reviews is not None else reviews_table({}, ())).filter(
        pl.col("decision") != "skip"
    )
    joined = joined.join(
        decided.select("id", "decision", "review_label"), on="id", how="left", maintain_order="left"
    )
    human = pl.col("decision").is_not_null()
    return (
        joined.filter(
            pl.when(human)
            .then(pl.col("decision") != "drop")
            .otherwise(pl.col("action") != "dropped")
        )
        .with_columns(
            label=pl.when(human)
            .then(pl.col("review_label"))
            .when(pl.col("action") == "relabelled")
            .then(pl.col("suggested_label"))
            .otherwise(pl.col("label")),
            reviewed_label=pl.when(human).then(pl.col("review_label")),
        )
        .drop("action", "suggested_label", "decision", "review_label")
    )


def applicable_reviews(
    train: pl.DataFrame, reviews: pl.DataFrame
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The decisions that apply to `train` (its row exists with the text and the given label
    reviewed), and what the reviews file holds: decisions by kind, and the stale ones (count and
    ids), which are reported and never applied to another row or label."""
    stale = stale_reviews(train, reviews)
    stale_ids = stale["missing"] + stale["text_changed"] + stale["label_changed"]
    applicable = reviews.filter(~pl.col("id").is_in(stale_ids))
    counts = applicable["decision"].value_counts()
    by_decision = dict(zip(counts["decision"].to_list(), counts["count"].to_list(), strict=True))
    report = {
        "decisions": reviews.height,
        "applied": applicable.filter(pl.col("decision") != "skip").height,
        **{f"{d}": int(by_decision.get(d, 0)) for d in DECISIONS},
        "stale": {
            "count": len(stale_ids),
            "row_missing": stale["missing"][:STALE_IDS_LISTED],
            "text_changed": stale["text_changed"][:STALE_IDS_LISTED],
            "label_changed": stale["label_changed"][:STALE_IDS_LISTED],
        },
    }
    if stale_ids:
        log.warning(
            "reviews: %d decision(s) not applied: %d on rows no longer in the train split (%s), "
            "%d on texts changed since the review (%s), %d on rows whose given label changed "
            "since the review (%s)",
            len(stale_ids),
            len(stale["missing"]),
            ", ".join(stale["missing"][:5]) or "-",
            len(stale["text_changed"]),
            ", ".join(stale["text_changed"][:5]) or "-",
            len(stale["label_changed"]),
            ", ".join(stale["label_changed"][:5]) or "-",
        )
    return applicable, report


def attach_tokens(rows: pl.DataFrame, tokens: pl.DataFrame) -> pl.DataFrame:
    """`rows` with their spaCy tokens and spaces, checked to rebuild each text exactly."""
    missing = {"id", "tokens", "whitespace"} - set(tokens.columns)
    if missing:
        raise StageError(f"{paths.TOKENS}: missing column(s) {sorted(missing)}")
    joined = rows.join(
        tokens.select("id", "tokens", "whitespace"), on="id", how="left", maintain_order="left"
    )
    absent = joined.filter(pl.col("tokens").is_null())
    if absent.height:
        raise StageError(
            f"{paths.TOKENS}: no tokens for id {absent['id'][0]} ({absent.height} row(s)); "
            "rerun `dvc repro tokenize`"
        )
    for row in joined.select("id", "text", "tokens", "whitespace").iter_rows(named=True):
        if len(row["tokens"]) != len(row["whitespace"]):
            raise StageError(
                f"{paths.TOKENS}: id {row['id']}: tokens and whitespace differ in length"
            )
        if detokenise(row["tokens"], row["whitespace"]) != row["text"]:
            raise StageError(
                f"{paths.TOKENS}: id {row['id']}: tokens do not rebuild the clean text; "
                "rerun `dvc repro tokenize`"
            )
    return joined


def augment_rows(
    rows: pl.DataFrame,
    rates: dict[str, float],
    n_aug: int,
    seed: int,
    synonyms: dict[str, list[str]],
) -> tuple[pl.DataFrame, dict[str, dict[str, int]]]:
    """`n_aug` new rows per row of `rows` (id, split, label, tokens, whitespace), each made by one
    op drawn at random among `rates`; returns them and per-op counts of rows added and skipped.

    Each copy has its own generator seeded by (seed, id, copy number), so a row's augmentations do
    not change when other rows are added or removed. A copy is skipped when the op finds nothing to
    act on or gives back the original text, so no row is empty or a duplicate of its source.
    """
    counts = {op: {"added": 0, "skipped": 0} for op in rates}
    out: dict[str, list] = {c: [] for c in OUT_COLUMNS}
    if n_aug == 0 or not rates:
        return pl.DataFrame(out, schema=_out_schema()), counts
    names = list(rates)
    for row in tqdm(rows.iter_rows(named=True), total=rows.height, desc="augment", unit="row"):
        original = detokenise(row["tokens"], row["whitespace"])
        for k in range(n_aug):
            rng = random.Random(f"{seed}:{row['id']}:{k}")
            op = rng.choice(names)
            result = OP_FUNCS[op](row["tokens"], row["whitespace"], rates[op], rng, synonyms)
            text = detokenise(*result) if result else ""
            if not text or text == original:
                counts[op]["skipped"] += 1
                continue
            counts[op]["added"] += 1
            for col, value in zip(
                OUT_COLUMNS,
                (
                    f"{row['id']}~aug{k}",
                    row["split"],
                    row["label"],
                    text,
                    row["id"],
                    op,
                    row["given_label"],
                    row["reviewed_label"],
                ),
                strict=True,
            ):
                out[col].append(value)
    return pl.DataFrame(out, schema=_out_schema()), counts


def _out_schema() -> dict[str, pl.DataType]:
    return {
        "id": pl.String(),
        "split": pl.String(),
        "label": pl.Int64(),
        "text": pl.String(),
        "augmented_from": pl.String(),
        "op": pl.String(),
        "given_label": pl.Int64(),
        "reviewed_label": pl.Int64(),
    }


def as_original(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows that pass through: no source id, op `original`."""
    return rows.select(
        "id",
        "split",
        "label",
        "text",
        augmented_from=pl.lit(None, dtype=pl.String),
        op=pl.lit("original"),
        given_label="given_label",
        reviewed_label=(
            pl.col("reviewed_label") if "reviewed_label" in rows.columns else pl.lit(None)
        ).cast(pl.Int64),
    )


def synonyms_for(rows: pl.DataFrame, params: AugmentParams) -> dict[str, list[str]]:
    """The synonym lexicon for the words of `rows`, from `augment.synonym_model`'s embeddings."""
    vocab, table = load_embedding_table(resolve_base_model(params.synonym_model))
    words = set(rows["tokens"].explode().drop_nulls().to_list())
    return build_synonyms(
        {w for w in words if is_word(w)},
        vocab,
        table,
        params.synonym_top_k,
        params.synonym_min_similarity,
    )


def run(
    clean: pl.DataFrame,
    tokens: pl.DataFrame,
    issues: pl.DataFrame,
    params: AugmentParams,
    label_names: tuple[str, ...],
    reviews: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """The stage without its files: (train table, test table, report). `reviews`: people's
    decisions (`stages.reviews.reviews_table`), none by default."""
    check_contract(clean, paths.CLEAN, label_names)
    rates = enabled_ops(params.ops)
    n_aug = params.n_aug
    train_in = clean.filter(pl.col("split") == "train")
    test = as_original(clean.filter(pl.col("split") == "test").with_columns(given_label="label"))
    applicable, reviews_report = applicable_reviews(
        train_in, reviews if reviews is not None else reviews_table({}, label_names)
    )
    automatic = apply_label_actions(train_in.with_columns(given_label="label"), issues)
    train = apply_label_actions(train_in.with_columns(given_label="label"), issues, applicable)
    n_relabelled = int((automatic["label"] != automatic["given_label"]).sum())
    reviewed = train.filter(pl.col("id").is_in(applicable["id"].to_list()))
    reviews_report["labels_changed"] = int((reviewed["label"] != reviewed["given_label"]).sum())
    synonyms: dict[str, list[str]] = {}
    added = pl.DataFrame(schema=_out_schema())
    counts = {op: {"added": 0, "skipped": 0} for op in rates}
    if n_aug and rates:
        with_tokens = attach_tokens(train, tokens)
        if {"synonym", "insert"} & set(rates):
            synonyms = synonyms_for(with_tokens, params)
        added, counts = augment_rows(with_tokens, rates, n_aug, params.seed, synonyms)
    train_out = pl.concat([as_original(train), added])
    report = {
        "train_rows_in": train_in.height,
        "test_rows": test.height,
        # What label_issues.action alone would do; `reviews` says what people decided over it.
        "dropped_by_label_issues": train_in.height - automatic.height,
        "relabelled_by_label_issues": n_relabelled,
        "reviews": reviews_report,
        "train_rows_kept": train.height,
        "n_aug": n_aug,
        "ops": {op: {"rate": rate, **counts[op]} for op, rate in rates.items()},
        "added": added.height,
        "train_rows_out": train_out.height,
        "synonym_lexicon_words": len(synonyms),
    }
    return train_out, test, report


def main() -> None:
    params = load_section("augment", AugmentParams)
    log.info("params %s", params)
    label_names = load_labels()
    reviews_file = Path(params.reviews)
    require_file(reviews_file)  # declared in dvc.yaml: an absent file is a misnamed param
    reviews = reviews_table(read_reviews(reviews_file, label_names), label_names)
    log.info("reviews: %d decision(s) in %s", reviews.height, reviews_file)
    train, test, report = run(
        read_table(paths.CLEAN),
        read_table(paths.TOKENS),
        read_table(paths.LABEL_ISSUES),
        params,
        label_names,
        reviews,
    )
    report["reviews"]["file"] = str(reviews_file)
    write_table(train, paths.TRAIN)
    write_table(test, paths.TEST)
    write_json(report, paths.AUGMENT_REPORT)
    log.info(
        "train %d -> %d rows (%d added), test %d rows",
        report["train_rows_in"],
        report["train_rows_out"],
        report["added"],
        report["test_rows"],
    )


if __name__ == "__main__":
    run_main(main, "augment")
