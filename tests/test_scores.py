"""`score`: coco-caption metrics, checked against values computed by hand on a small fixture
and against the official `COCOEvalCap` pipeline where Java is installed."""
from __future__ import annotations

import json
import math
import shutil

import pytest
from click.testing import CliRunner

from internvl_batch.cli import cli
from internvl_batch.outputs import OutputError, open_output
from internvl_batch.scores import (PTB_TOKENIZER, PY_TOKENIZER, score_corpus, score_output,
                                   tokenize_ptb, tokenize_python)
from tests.output_helpers import metadata, row, write_output

pytest.importorskip("pycocoevalcap")
HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA,
                                reason="java is not installed (apt-get install "
                                       "default-jre-headless; scripts/test.sh does as root)")

# Three images, vocabularies disjoint between images (so CIDEr-D's IDF is the same for every
# n-gram and cancels out of its cosines). After coco-caption tokenization (lower case,
# punctuation dropped):
#   1: cand "a black dog runs"        refs "a black dog runs", "a dog is running"
#   2: cand "two cats sleep in beds"  ref  "two cats sleep on beds"
#   3: cand "red car"                 ref  "red car parked by houses"
CANDIDATES = ["A black dog runs.", "Two cats sleep in beds.", "Red car"]
REFERENCES = [["A black dog runs.", "A dog is running."], ["Two cats sleep on beds."],
              ["Red car parked by houses."]]

# BLEU (corpus level: clipped n-gram matches / candidate n-grams, summed over images):
#   1-grams 4/4 + 4/5 ("in" unmatched) + 2/2 = 10/11
#   2-grams 3/3 + 2/4 (two cats, cats sleep) + 1/1 = 6/8
#   3-grams 2/2 + 1/3 (two cats sleep) + 0/0 = 3/5
#   4-grams 1/1 + 0/2 + 0/0 = 1/3
#   brevity: candidates 4+5+2 = 11 words, closest references 4+5+5 = 14: BP = exp(1 - 14/11)
BP = math.exp(1 - 14 / 11)
P = [10 / 11, 6 / 8, 3 / 5, 1 / 3]
BLEU = [BP * math.prod(P[:n]) ** (1 / n) for n in (1, 2, 3, 4)]
# = 0.692091, 0.628623, 0.565149, 0.462627
# ROUGE-L (per image: LCS-based precision and recall, each maxed over references, F with
# beta = 1.2; then the mean over images):
#   1: identical to its first reference: P = R = 1 -> 1
#   2: LCS "two cats sleep beds" = 4: P = R = 4/5 -> 0.8
#   3: LCS 2: P = 2/2, R = 2/5 -> (1 + 1.44) * 1 * 0.4 / (0.4 + 1.44 * 1) = 0.530435
ROUGE_L = (1 + 0.8 + 2.44 * 0.4 / (0.4 + 1.44)) / 3  # 0.776812
# CIDEr-D (coco-caption's "CIDEr"): per n = 1..4 the clipped tf-idf cosine between candidate
# and each reference, times exp(-(len_c - len_r)^2 / (2 * 6^2)), averaged over n and
# references, times 10. With every weight equal, a cosine is |common n-grams| /
# sqrt(|cand n-grams| * |ref n-grams|). (coco-caption's "length" counts bigrams: 1 less than
# words for both sides, so the difference is the difference in words.)
#   1: ref a: cosines 1, 1, 1, 1; ref b: 1-grams {a, dog} 2/sqrt(4*4) = .5, others 0
#      -> 10 * (4 + .5) / 4 / 2 = 5.625
#   2: 4/sqrt(5*5), 2/sqrt(4*4), 1/sqrt(3*3), 0 -> 10 * (.8 + .5 + 1/3) / 4 = 4.083333
#   3: 2/sqrt(2*5), 1/sqrt(1*4), no 3- or 4-grams; length penalty exp(-3^2/72)
#      -> 10 * (0.632456 + .5) * 0.882497 / 4 = 2.498459
CIDER_D = (5.625 + 10 * (0.8 + 0.5 + 1 / 3) / 4
           + 10 * (2 / math.sqrt(10) + 0.5) * math.exp(-9 / 72) / 4) / 3  # 4.068935


def _check_hand_values(metrics):
    for n in (1, 2, 3, 4):  # coco-caption adds 1e-9 to counts: differences of ~1e-9
        assert metrics[f"BLEU-{n}"] == pytest.approx(BLEU[n - 1], abs=1e-7), n
    assert metrics["ROUGE-L"] == pytest.approx(ROUGE_L, abs=1e-12)
    assert metrics["CIDEr-D"] == pytest.approx(CIDER_D, abs=1e-9)


def test_hand_computed_values_python_tokenizer():
    metrics, unavailable, tokenizer = score_corpus(CANDIDATES, REFERENCES, use_java=False)
    assert tokenizer == PY_TOKENIZER
    _check_hand_values(metrics)
    assert metrics["METEOR"] is None and "Java" in unavailable["METEOR"]
    assert metrics["SPICE"] is None and unavailable["SPICE"]


@pytest.fixture(scope="module")
def ptb_scores():
    return score_corpus(CANDIDATES, REFERENCES, use_java=True)


@needs_java
def test_hand_computed_values_ptb_and_meteor(ptb_scores):
    metrics, unavailable, tokenizer = ptb_scores
    assert tokenizer == PTB_TOKENIZER
    _check_hand_values(metrics)
    assert 0.2 < metrics["METEOR"] < 1.0  # checked exactly against the official run below
    assert "METEOR" not in unavailable
    # SPICE's Stanford CoreNLP models are a download the package does not ship
    assert metrics["SPICE"] is None and "CoreNLP" in unavailable["SPICE"]


@needs_java
def test_same_numbers_as_official_cocoevalcap(ptb_scores, tmp_path, monkeypatch, capsys):
    """The official evaluation (pycocotools COCO objects + COCOEvalCap.evaluate, its own
    PTBTokenizer call) on the same captions. Its SPICE would download CoreNLP: replaced by a
    stub, the only change."""
    import pycocoevalcap.eval as official
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE (stubbed)"

    monkeypatch.setattr(official, "Spice", NoSpice)
    gt = {"images": [{"id": i} for i in range(3)], "type": "captions", "info": {},
          "licenses": [],
          "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                          for i, refs in enumerate(REFERENCES) for k, c in enumerate(refs)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = COCO(str(tmp_path / "gt.json"))
    res = coco.loadRes([{"image_id": i, "caption": c} for i, c in enumerate(CANDIDATES)])
    ev = official.COCOEvalCap(coco, res)
    ev.params["image_id"] = res.getImgIds()
    ev.evaluate()
    mine = ptb_scores[0]
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
             "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr-D": "CIDEr"}
    for ours, theirs in names.items():
        assert mine[ours] == pytest.approx(ev.eval[theirs], abs=1e-12), ours


@needs_java
def test_python_tokenizer_agrees_with_ptb():
    s = ["A black dog runs.", "the cat's toy isn't (red) -- café, \"ok\"", "",
         "Two cats sleep in beds!", "a dog\u2028runs\rfast", "It's 3.5 m-long; don't?",
         "a man,riding a horse...", "  many   spaces  "]
    assert tokenize_python(s) == tokenize_ptb(s)


def _fixture_output(tmp_path, extra_rows=()):
    rows = [row(i, f"{i}.jpg", caption=c, references=r)
            for i, (c, r) in enumerate(zip(CANDIDATES, REFERENCES))]
    rows += list(extra_rows)
    return write_output(tmp_path / "out", rows, metadata({"target": str(tmp_path)}))


def test_score_output_counts_and_excludes(tmp_path):
    out = _fixture_output(tmp_path, [
        row(3, "3.jpg", error="missing file: /x/3.jpg"),
        row(4, "4.jpg", error="corrupt image: OSError: truncated"),
        row(5, "5.jpg", caption="a caption with no reference", references=()),
        row(6, "6.jpg", caption="blank references", references=["", "  "]),
        row(7, "7.jpg", caption=None),  # no error but no caption: never silently scored
    ])
    s = score_output(open_output(out), use_java=False)
    assert (s.rows, s.scored) == (8, 3)
    assert s.excluded == {"error": 2, "no_caption": 1, "no_references": 2}
    _check_hand_values(s.metrics)
    table = s.table()
    assert "scored 3, excluded 5 (error 2, no caption 1, no references 2)" in table
    assert "SPICE     unavailable:" in table


@needs_java
def test_cli_score_writes_scores_json(tmp_path):
    out = _fixture_output(tmp_path, [row(3, "3.jpg", error="missing file: 3.jpg")])
    r = CliRunner().invoke(cli, ["score", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "scores.json").read_text())
    assert doc["rows"] == 4 and doc["scored"] == 3 and doc["excluded"]["error"] == 1
    assert doc["tokenizer"] == PTB_TOKENIZER and doc["library"].startswith("pycocoevalcap")
    assert doc["metrics"]["CIDEr-D"] == pytest.approx(CIDER_D, abs=1e-9)
    assert doc["metrics"]["METEOR"] > 0 and doc["metrics"]["SPICE"] is None
    assert "CIDEr-D   4.0689" in r.output and f"wrote {out / 'scores.json'}" in r.output


def test_cli_score_bad_input(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["score", str(tmp_path / "nope")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == \
        [f"Error: {tmp_path / 'nope'} does not exist"]
    (tmp_path / "empty").mkdir()
    r = runner.invoke(cli, ["score", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no part-*.parquet in" in r.output
    assert len(r.output.strip().splitlines()) == 1
    out = write_output(tmp_path / "norefs", [row(0, "0.jpg", references=()),
                                             row(1, "1.jpg", error="missing file: 1.jpg")],
                       metadata({}))
    r = runner.invoke(cli, ["score", str(out)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "0 of 2 rows" in r.output and "no references 1" in r.output
    assert not (out / "scores.json").exists()
    with pytest.raises(OutputError):
        open_output(tmp_path / "nope.parquet")
