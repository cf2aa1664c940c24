"""`newsclf monitor DIR`: a clean log passes, each kind of drift is flagged with its reason, faults
exit 2 naming the file, and the report is a function of its inputs.

The data is built here, not pulled: train texts and a clean log drawn from one generator of
news-like sentences, and shifted logs (one class only, other languages and domains, texts cut to
20 characters). The bounds are params.yaml's own `monitor:` section, so a change of a default
that would miss one of these shifts, or flag the clean log, fails here. bench/bench_monitor.py
measures the same shifts on the real test split.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from newsclf.cli import main
from newsclf.monitor import MonitorError, monitor
from newsclf.textlog import LABELS_KEY, LogRow, TextLog, log_files
from tests.pipeline_fixture import REPO_ROOT

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
PARAMS = REPO_ROOT / "params.yaml"
START = datetime(2025, 3, 1, tzinfo=UTC)
SHA = "ab" * 32

TOPIC_WORDS = {
    "World": "minister government election troops president parliament embassy rebels ceasefire "
    "talks border refugees capital opposition treaty vote crisis leaders diplomats protest",
    "Sports": "match season coach striker championship league goal victory team players cup "
    "tournament final injury scored champions race medal stadium fans",
    "Business": "shares profit market investors quarter earnings stocks prices company bank "
    "oil sales deal billion economy growth rates merger revenue analysts",
    "Sci/Tech": "software internet computer researchers users technology space launch network "
    "data chip wireless scientists browser security online devices study mobile web",
}
SHARED_WORDS = (
    "the a of to in on for with said after new its over by from as at two year week first "
    "more than will has have was were that this their last could may us officials reported "
    "monday tuesday wednesday thursday friday plans expected top"
)

# Texts no news model was trained on: other languages; recipes and code comments. Logs of them
# are these sentences joined one to three at a time (bench/bench_monitor.py measures the same).
OTHER_LANGUAGE = [
    "Der Zug nach Hamburg fährt heute wegen Bauarbeiten später ab.",
    "Wir treffen uns morgen früh vor der Bäckerei an der Ecke.",
    "Kannst du bitte die Fenster schließen, bevor du gehst?",
    "Meine Großmutter erzählt gern Geschichten aus ihrer Kindheit.",
    "Im Herbst färben sich die Blätter im Park gelb und rot.",
    "Das Wohnzimmer braucht dringend einen neuen Anstrich.",
    "Nach dem Abendessen gehen wir noch eine Runde spazieren.",
    "Die Katze schläft den ganzen Nachmittag auf dem Sofa.",
    "Ich habe meinen Regenschirm schon wieder im Bus vergessen.",
    "Unser Nachbar baut im Garten ein kleines Gewächshaus.",
    "Le marché du samedi matin est plein de fromages et de fleurs.",
    "Nous avons oublié les clés de la maison chez ma sœur.",
    "Il pleut depuis trois jours, les enfants s'ennuient beaucoup.",
    "Elle apprend le piano tous les mercredis après l'école.",
    "La boulangerie du quartier ferme pendant tout le mois d'août.",
    "Mon voisin promène son chien deux fois par jour au bord du canal.",
    "Ce soir, nous dînons chez des amis qui habitent à la campagne.",
    "Il faut arroser les tomates avant que le soleil se couche.",
    "El tren de la mañana siempre llega con diez minutos de retraso.",
    "Mi abuela prepara una sopa deliciosa todos los domingos.",
    "Los niños juegan en la plaza hasta que anochece.",
]
OTHER_TOPIC = [
    "Preheat the oven and grease a loaf tin with a little butter.",
    "Whisk two eggs with the sugar until pale and fluffy.",
    "Fold in the flour gently, then stir in the melted chocolate.",
    "Simmer the onions and garlic until soft, then add the chopped tomatoes.",
    "Season with salt, pepper and a pinch of nutmeg before serving.",
    "Knead the dough for ten minutes and let it rise in a warm place.",
    "Sprinkle grated cheese on top and bake until golden and bubbly.",
    "Garnish with fresh basil leaves and a drizzle of olive oil.",
    "TODO: refactor this loop once the parser returns an iterator.",
    "Returns None when the cache key is missing; callers must handle it.",
    "Retry the request up to three times with exponential backoff.",
    "Keep this buffer aligned to 64 bytes or the SIMD path segfaults.",
    "FIXME: the mutex is held while logging, which can deadlock under load.",
    "Convert timestamps to UTC before comparing them with the index.",
    "Do not call this helper from the render thread; it blocks on disk reads.",
    "Deprecated: use parse_config instead, removed in the next major version.",
]
OTHER_DOMAIN = OTHER_LANGUAGE + OTHER_TOPIC


def news_texts(n: int, rng: np.random.Generator, only: str | None = None) -> tuple[list, list]:
    """`n` news-like sentences with their labels: a third topic words of the label, the rest
    shared words, 12 to 45 words each (one generator for train texts and clean logs)."""
    texts, labels, shared = [], [], SHARED_WORDS.split()
    for _ in range(n):
        label = only or LABELS[rng.integers(len(LABELS))]
        topic = TOPIC_WORDS[label].split()
        words = [
            str(rng.choice(topic)) if rng.random() < 0.33 else str(rng.choice(shared))
            for _ in range(rng.integers(12, 46))
        ]
        texts.append(" ".join(words).capitalize() + ".")
        labels.append(label)
    return texts, labels


def other_domain_texts(
    n: int, rng: np.random.Generator, sentences: list[str] = OTHER_DOMAIN
) -> list[str]:
    """`n` texts of one to three of the `sentences` each."""
    return [
        " ".join(rng.choice(sentences, size=rng.integers(1, 4), replace=False)) for _ in range(n)
    ]


# The model's confidence on its test split, as export writes it: mostly sure, a tail below 0.8.
EDGES = [i / 20 for i in range(21)]


def confident(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(1 - rng.beta(0.6, 8.0, size=n), 0.3, 1.0)


def unsure(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.3, 0.8, size=n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train table, model folder (metadata only) and a copy of params.yaml."""
    root = tmp_path_factory.mktemp("monitor")
    texts, labels = news_texts(1200, np.random.default_rng(1))
    n_augmented = 400  # copies of one Sports text: were they reference rows, shares would move
    pl.DataFrame(
        {
            "id": [f"t{i}" for i in range(len(texts) + n_augmented)],
            "split": ["train"] * (len(texts) + n_augmented),
            "label": [LABELS.index(label) for label in labels] + [1] * n_augmented,
            "text": texts + ["Cup goal."] * n_augmented,
            "op": ["original"] * len(texts) + ["swap"] * n_augmented,
        }
    ).write_parquet(root / "train.parquet")
    reference = confident(7600, np.random.default_rng(2))
    counts, _ = np.histogram(reference, bins=20, range=(0.0, 1.0))
    model = root / "model"
    model.mkdir()
    meta = {
        "labels": LABELS,
        "max_length": 128,
        "models": {"fp32": "model.onnx"},
        "calibration": {
            "temperature": 1.0,
            "confidence_reference": {
                "n": len(reference),
                "mean": float(reference.mean()),
                "histogram": {"edges": EDGES, "counts": counts.tolist()},
            },
        },
    }
    (model / "newsclf_onnx.json").write_text(json.dumps(meta))
    return {"train": root / "train.parquet", "model": model, "params": PARAMS}


def write_log(
    folder: Path,
    texts: list[str],
    top_labels: list[str],
    confidence: np.ndarray,
    labels: list[str] = LABELS,
    rows_per_file: int = 250,
) -> Path:
    log = TextLog(folder, labels, rows_per_file=rows_per_file, flush_s=3600)
    rows = []
    for i, (text, top, conf) in enumerate(zip(texts, top_labels, confidence, strict=True)):
        scores = [(1 - conf) / (len(labels) - 1)] * len(labels)
        scores[labels.index(top)] = conf
        rows.append(
            LogRow(START + timedelta(seconds=i), text, top, top, float(conf), scores, SHA, False)
        )
    log.append(rows)
    log.close()
    return folder


def clean_log(folder: Path, n: int = 600, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    texts, labels = news_texts(n, rng)
    return write_log(folder, texts, labels, confident(n, rng))


def run_monitor(setup: dict[str, Path], log: Path, **filters) -> dict:
    return monitor(log, setup["model"], setup["train"], setup["params"], **filters)


def flagged(report: dict) -> dict[str, str]:
    return {c["name"]: c["reason"] for c in report["checks"] if c["flagged"]}


def test_a_clean_log_is_not_flagged(setup, tmp_path: Path) -> None:
    log = clean_log(tmp_path / "log")
    assert len(log_files(log)) == 3  # a log of several files
    report = run_monitor(setup, log)
    values = {c["name"]: c["value"] for c in report["checks"]}
    assert flagged(report) == {}, values
    assert report["log"]["rows"] == 600
    assert report["reference"]["rows"] == 1200  # the augmented copies are left out
    assert values["text_drift"] < 0.6


def test_one_class_only_is_flagged_by_label_shares(setup, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    texts, labels = news_texts(500, rng, only="Sports")
    report = run_monitor(setup, write_log(tmp_path / "log", texts, labels, confident(500, rng)))
    reasons = flagged(report)
    assert "label_shares" in reasons
    assert "Sports is 100.0% of logged texts" in reasons["label_shares"]


def test_other_languages_and_domains_are_flagged_by_vocabulary_and_text_drift(
    setup, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    texts = other_domain_texts(500, rng)
    labels = [LABELS[i] for i in rng.integers(len(LABELS), size=500)]
    report = run_monitor(setup, write_log(tmp_path / "log", texts, labels, unsure(500, rng)))
    reasons = flagged(report)
    assert {"vocabulary", "text_drift", "confidence"} <= set(reasons), reasons
    assert "another language or vocabulary" in reasons["vocabulary"]
    drift = next(c for c in report["checks"] if c["name"] == "text_drift")
    typical = {w["word"] for w in drift["details"]["characteristic_words"]}
    other_words = {w for t in OTHER_DOMAIN for w in re.findall(r"\b\w\w+\b", t.lower())}
    assert typical and typical <= other_words, typical


def test_texts_cut_short_are_flagged_by_text_length(setup, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    texts, labels = news_texts(500, rng)
    cut = [text[:20] for text in texts]
    report = run_monitor(setup, write_log(tmp_path / "log", cut, labels, confident(500, rng)))
    reasons = flagged(report)
    assert "text_length" in reasons
    assert "median 20 characters" in reasons["text_length"]


def test_exit_status_and_reports_through_the_cli(setup, tmp_path: Path, capsys) -> None:
    clean = clean_log(tmp_path / "clean")
    common = ["--model", str(setup["model"]), "--reference", str(setup["train"])]
    common += ["--params", str(setup["params"])]
    out = tmp_path / "out"
    # A fresh process, as cron runs it: the command must not import torch or transformers.
    probe = (
        "import sys; from newsclf.cli import main; code = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, "monitor", str(clean), *common, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "no drift" in result.stdout
    assert json.loads((out / "monitor.json").read_text())["flagged"] is False

    rng = np.random.default_rng(7)
    texts = [f"<script>alert(1)</script> {text}" for text in other_domain_texts(500, rng)]
    shifted = write_log(tmp_path / "shifted", texts, ["World"] * 500, unsure(500, rng))
    assert main(["monitor", str(shifted), *common, "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "FLAGGED" in printed and "drift: " in printed
    page = (out / "monitor.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page  # logged texts are escaped
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched

    # Faults: one line naming the file, exit status 2.
    assert main(["monitor", str(tmp_path / "nowhere"), *common]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    no_reference = tmp_path / "no_reference"
    no_reference.mkdir()
    (no_reference / "newsclf_onnx.json").write_text(json.dumps({"labels": LABELS}))
    assert main(["monitor", str(clean), *common, "--model", str(no_reference)]) == 2
    err = capsys.readouterr().err
    assert "newsclf_onnx.json: no calibration.confidence_reference" in err
    assert len(err.strip().splitlines()) == 1
    few = write_log(tmp_path / "few", *news_texts(20, rng), confident(20, rng))
    assert main(["monitor", str(few), *common]) == 2
    assert "fewer than monitor.min_texts" in capsys.readouterr().err
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("monitor: [unclosed\n")
    assert main(["monitor", str(clean), *common, "--params", str(not_yaml)]) == 2
    err = capsys.readouterr().err
    assert f"{not_yaml}: not valid YAML" in err and len(err.strip().splitlines()) == 1


def test_a_log_whose_files_disagree_on_labels_is_refused(setup, tmp_path: Path) -> None:
    log = clean_log(tmp_path / "log")
    renamed = ["World", "Sports", "Business", "Science"]
    texts, labels = news_texts(10, np.random.default_rng(8))
    write_log(log, texts, [renamed[LABELS.index(x)] for x in labels], np.ones(10), renamed)
    files = log_files(log)
    assert len(files) == 4
    with pytest.raises(MonitorError, match=f"{files[-1].name}: labels .*Science.* differ"):
        run_monitor(setup, log)
    # A log whose labels all differ from the model's is another model's: refused too.
    other = tmp_path / "other"
    write_log(
        other, texts * 60, [renamed[LABELS.index(x)] for x in labels] * 60, np.ones(600), renamed
    )
    with pytest.raises(MonitorError, match="written by another model"):
        run_monitor(setup, other)
    import pyarrow.parquet as pq

    assert json.loads(pq.read_schema(files[0]).metadata[LABELS_KEY]) == LABELS


def test_the_report_is_a_function_of_its_inputs(setup, tmp_path: Path) -> None:
    log = clean_log(tmp_path / "log", n=500)
    common = ["--model", str(setup["model"]), "--reference", str(setup["train"])]
    common += ["--params", str(setup["params"])]
    for out in ("a", "b"):
        assert main(["monitor", str(log), *common, "--out", str(tmp_path / out)]) == 0
    for name in ("monitor.json", "monitor.html"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_filters_select_rows_by_time_and_model(setup, tmp_path: Path) -> None:
    log = clean_log(tmp_path / "log", n=1000)
    report = run_monitor(setup, log, since=(START + timedelta(seconds=400)).isoformat())
    assert report["log"]["rows"] == 600 and report["log"]["rows_in_files"] == 1000
    with pytest.raises(MonitorError, match="0 logged texts after --since/--model-sha256"):
        run_monitor(setup, log, model_sha256="cd")
    assert run_monitor(setup, log, model_sha256=SHA[:8])["log"]["rows"] == 1000


def test_the_monitor_section_of_params_yaml_is_checked(setup, tmp_path: Path) -> None:
    import yaml

    from stages.common import StageError
    from stages.params import parse_section
    from stages.sections import MonitorParams
    from stages.validate_params import params_problems

    params = yaml.safe_load(PARAMS.read_text())
    parse_section(params["monitor"], MonitorParams, "monitor")
    assert params_problems(params) == []
    with pytest.raises(StageError, match=re.escape("unknown key(s) monitor.typo")):
        parse_section({**params["monitor"], "typo": 1}, MonitorParams, "monitor")
    params["monitor"]["max_domain_auc"] = 0.4
    assert params_problems(params) == [
        "params.yaml: bad value(s) monitor.max_domain_auc=0.4 (must be in (0.5, 1])"
    ]
    # ...and the command says so, exit status 2.
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    log = clean_log(tmp_path / "log", n=500)
    with pytest.raises(MonitorError, match=re.escape("monitor.max_domain_auc=0.4")):
        monitor(log, setup["model"], setup["train"], bad)


def test_the_text_sample_is_the_seeded_choice_of_rows_across_files(tmp_path: Path) -> None:
    from newsclf.monitor import read_log

    log = clean_log(tmp_path / "log", n=600)  # three files
    every = pl.read_parquet(log_files(log), columns=["text"])["text"].to_list()
    chosen = np.sort(np.random.default_rng(9).choice(600, size=100, replace=False))
    assert read_log(log, EDGES, 100, seed=9).sample == [every[i] for i in chosen]
    whole = read_log(log, EDGES, 2000, seed=9)
    assert whole.sample == every and whole.rows == 600
    assert sum(whole.confidence.counts) == 600 and sum(whole.lengths.values()) == 600
