"""Corpus-level caption metrics against the `references` column (`internvl-batch score`).

Library: `pycocoevalcap` (PyPI), the Python 3 package of the official COCO caption evaluation
(coco-caption: the code behind the COCO leaderboard and the numbers captioning papers report).
A re-implementation would have to be shown equal to it anyway, so its own scorers are used:

- BLEU-1..4 (`Bleu(4)`, corpus-level, "closest" reference length), ROUGE-L (`Rouge`, β = 1.2)
  and CIDEr-D (`Cider`: coco-caption's "CIDEr" entry is CIDEr-D: clipped n-gram counts,
  Gaussian length penalty σ = 6, ×10, IDF from the references of the scored corpus) are pure
  Python and always run.
- Tokenization is coco-caption's: Stanford PTBTokenizer 3.4.1 (the jar ships inside the
  package) with `-preserveLines -lowerCase`, then the same punctuation tokens dropped. It is
  started here rather than through `PTBTokenizer.tokenize`, which writes its temp file into
  site-packages and pairs output lines with captions by position without checking the count;
  here whitespace (a caption's `\\r` or `\\u2028` would split a line) is normalised first, the
  input is UTF-8, and the line count is checked. Without Java a documented approximation
  (lower-case, PTB-like regex split, same punctuation list) is used and `scores.json` says
  so under `tokenizer`: numbers then may differ slightly from the official ones.
- METEOR 1.5 runs the package's `meteor-1.5.jar` (with its paraphrase table, all offline);
  it needs Java (`apt-get install default-jre-headless`), and is reported unavailable without.
- SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads from Stanford's site on
  first use; no package registry ships it, so offline it is reported unavailable with that
  reason (it runs if the two jars have been put into `pycocoevalcap/spice/lib/` by hand).

Rows with an error, without a caption, or without a non-empty reference are excluded and
counted (`excluded` in scores.json and in the printed table), never dropped silently.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .outputs import Output, OutputError

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
PTB_TOKENIZER = "Stanford PTBTokenizer 3.4.1 (coco-caption)"
PY_TOKENIZER = "python approximation of coco-caption's PTB tokenization (no Java)"


@dataclass
class Scores:
    metrics: dict[str, float | None]
    unavailable: dict[str, str]          # metric -> why it was not computed
    rows: int                            # rows in the output
    scored: int                          # rows that entered the metrics
    excluded: dict[str, int]             # reason -> rows
    tokenizer: str
    library: str
    output: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        ex = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.excluded.items())
        lines = [f"scores for {self.output} ({self.library}; tokenizer: {self.tokenizer})",
                 f"rows {self.rows}: scored {self.scored}, excluded "
                 f"{sum(self.excluded.values())} ({ex})",
                 f"{'metric':<8}  score"]
        for m in METRICS:
            v = self.metrics.get(m)
            lines.append(f"{m:<8}  " + (f"{v:.4f}" if v is not None
                                        else f"unavailable: {self.unavailable.get(m, '?')}"))
        return "\n".join(lines)


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pycocoevalcap {version('pycocoevalcap')}"
    except PackageNotFoundError:
        return "pycocoevalcap (not installed)"


def _package_dir() -> Path:
    try:
        import pycocoevalcap
    except ImportError:
        raise OutputError("score needs the 'pycocoevalcap' package "
                          "(pip install pycocoevalcap)") from None
    return Path(list(pycocoevalcap.__path__)[0])  # a namespace package: no __file__


def java_available() -> bool:
    java = shutil.which("java")
    if not java:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# -- tokenization ---------------------------------------------------------------------------

def _one_line(s: str) -> str:
    # str.split() also splits on \r, \x0b, \x0c, \x1c-\x1f, \x85, \u2028, \u2029: every
    # character that could end a line for Java too
    return " ".join(s.split())


def tokenize_ptb(sentences: list[str]) -> list[str]:
    """coco-caption's tokenization, one output per input, in order."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    jar = _package_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.TemporaryDirectory(prefix="ivb-ptb-") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_text("\n".join(_one_line(s) for s in sentences), encoding="utf-8")
        p = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                            "-preserveLines", "-lowerCase", "-encoding", "utf-8", str(src)],
                           capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(f"PTBTokenizer exited {p.returncode}: "
                           f"{p.stderr.decode(errors='replace').strip()[-300:]}")
    lines = p.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "" and len(lines) == len(sentences) + 1:
        lines.pop()
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} "
                           "captions")
    punct = set(PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines]


_CLITIC = re.compile(r"(\w)(n't)\b")
_PY_TOKEN = re.compile(r"n't|'\w+|\w+(?:[-.]\w+)*|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def tokenize_python(sentences: list[str]) -> list[str]:
    """Without Java: lower-case, split words from punctuation and clitics ('s, n't) as PTB
    does, brackets as PTB's -lrb- etc. (which coco-caption keeps: its list has them in upper
    case), then drop the same punctuation tokens. Agrees with PTB on plain captions."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    drop = set(PUNCTUATIONS) | {'"'}  # PTB turns quotes into `` and '', both dropped
    out = []
    for s in sentences:
        s = _CLITIC.sub(r"\1 \2", _one_line(s).lower())
        toks = (_BRACKETS.get(t, t) for t in _PY_TOKEN.findall(s))
        out.append(" ".join(t for t in toks if t not in drop))
    return out


# -- scoring --------------------------------------------------------------------------------

def score_corpus(candidates: list[str], references: list[list[str]], *,
                 use_java: bool | None = None, spice: bool = True
                 ) -> tuple[dict[str, float | None], dict[str, str], str]:
    """(metrics, unavailable, tokenizer) for aligned candidates and reference lists."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError("need the same, non-zero number of candidates and reference lists")
    _package_dir()
    java = java_available() if use_java is None else use_java
    flat = list(candidates) + [r for refs in references for r in refs]
    if java:
        toks, tokenizer = tokenize_ptb(flat), PTB_TOKENIZER
    else:
        toks, tokenizer = tokenize_python(flat), PY_TOKENIZER
    n = len(candidates)
    res = {i: [toks[i]] for i in range(n)}
    gts, k = {}, n
    for i, refs in enumerate(references):
        gts[i] = toks[k:k + len(refs)]
        k += len(refs)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    metrics: dict[str, float | None] = {m: None for m in METRICS}
    unavailable: dict[str, str] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for j, v in enumerate(bleu, 1):
        metrics[f"BLEU-{j}"] = float(v)
    metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    if java:
        try:
            metrics["METEOR"] = _meteor(gts, res)
        except Exception as e:  # the jar failing must not cost the other metrics
            unavailable["METEOR"] = f"meteor-1.5.jar failed: {type(e).__name__}: {e}"[:300]
    else:
        unavailable["METEOR"] = "needs Java (apt-get install default-jre-headless)"
    if spice:
        why = _spice_missing(java)
        if why:
            unavailable["SPICE"] = why
        else:
            try:
                from pycocoevalcap.spice.spice import Spice

                metrics["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except Exception as e:
                unavailable["SPICE"] = f"spice-1.0.jar failed: {type(e).__name__}: {e}"[:300]
    else:
        unavailable["SPICE"] = "not requested"
    return metrics, unavailable, tokenizer


def _meteor(gts, res) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()
    try:
        return float(m.compute_score(gts, res)[0])
    finally:  # its __del__ does the same; closing twice is harmless
        p = m.meteor_p
        p.stdin.close()
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()


def _spice_missing(java: bool) -> str | None:
    lib = _package_dir() / "spice" / "lib"
    if not java:
        return "needs Java and Stanford CoreNLP 3.6.0"
    need = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    if not all(p.is_file() for p in need):
        return ("needs Stanford CoreNLP 3.6.0 (pycocoevalcap/spice/lib/stanford-corenlp-3.6.0"
                "[-models].jar), which pycocoevalcap downloads from Stanford on first use; no "
                "package registry ships it and scoring runs offline")
    return None


def score_output(output: Output, *, use_java: bool | None = None, spice: bool = True) -> Scores:
    t = output.read(["caption", "references", "error"])
    captions = t.column("caption").to_pylist()
    refs_col = t.column("references").to_pylist()
    errors = t.column("error").to_pylist()
    excluded = {"error": 0, "no_caption": 0, "no_references": 0}
    cands, refs = [], []
    for cap, rs, err in zip(captions, refs_col, errors):
        rs = [r for r in (rs or []) if r and r.strip()]
        if err:
            excluded["error"] += 1
        elif cap is None:
            excluded["no_caption"] += 1
        elif not rs:
            excluded["no_references"] += 1
        else:
            cands.append(cap)
            refs.append(rs)
    if not cands:
        raise OutputError(f"nothing to score in {output.path}: 0 of {len(captions)} rows have "
                          f"a caption and references (errors {excluded['error']}, no caption "
                          f"{excluded['no_caption']}, no references {excluded['no_references']})")
    metrics, unavailable, tokenizer = score_corpus(cands, refs, use_java=use_java, spice=spice)
    md = output.metadata()
    cfg = md.get("config") or {}
    extra = {"model": (cfg.get("engine") or {}).get("model"),
             "dataset": (cfg.get("source") or {}).get("kind"),
             "prompt": (cfg.get("prompt") or {}).get("prompt")}
    if output.note:  # scores.json of part of a run says so too, not only the terminal
        extra["partial"] = output.note
    return Scores(metrics, unavailable, len(captions), len(cands), excluded, tokenizer,
                  library_version(), str(output.path), extra)


def write(scores: Scores, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(scores.to_dict(), indent=2))
    os.replace(tmp, path)
    return path
