"""A static HTML gallery of an output (`internvl-batch show`): images beside their captions.

Cost is bounded by what is shown, not by the output's size: the `error` column is read first
(every row, one small column), a deterministic sample is drawn from it (every error row kept,
up to a cap; the captioned rows sampled with a seed), then only the sampled rows' columns are
read, from only the row groups holding them, and thumbnails are made only for those rows
(`images.load_rgb` with a small `max_side`: libjpeg's draft mode decodes JPEGs at 1/2..1/8
scale). Thumbnails are embedded as small base64 JPEGs, so each page is one self-contained
file; large selections are split into several page files linked to each other.

Images are found again from the run metadata (`config.source` in the Parquet key-value
metadata) and each row's `image_ref` / `seq`: a path relative to the folder, COCO image
directory or sample set; for Parquet sources the `seq`-th row of the source glob; for a saved
Hugging Face dataset its `seq`-th row; for WebDataset tars the member named in `image_ref`
(TAR#MEMBER). An image that cannot be found or decoded becomes a
placeholder that says why. Everything taken from the data is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .outputs import Output, OutputError, take

COLUMNS = ["id", "seq", "image_ref", "references", "caption", "prompt_tokens", "image_tokens",
           "tiles", "output_tokens", "finish_reason", "error"]


@dataclass(frozen=True)
class GalleryOptions:
    sample: int | None = 500       # captioned rows shown; None: all of them
    page_size: int = 100           # cards per page file
    seed: int = 0
    max_errors: int = 200          # error rows shown (all of them up to this many)
    thumb_px: int = 192            # longest thumbnail side
    image_root: Path | None = None  # where relative image paths live, overriding the metadata
    workers: int | None = None      # thumbnail threads; None: min(8, CPUs)


def error_kind(error: str) -> str:
    """'missing file: /x/1.jpg' -> 'missing file'; digits become N so sizes group together."""
    head = error.split(": ", 1)[0].strip()
    return re.sub(r"\d+", "N", head)[:80] or "error"


# -- choosing rows ---------------------------------------------------------------------------

def choose(errors: list, opts: GalleryOptions) -> tuple[list[int], list[int]]:
    """(captioned row positions, error row positions) to show, both ascending. Deterministic
    for a given seed; error rows are kept before any captioned row is sampled."""
    import numpy as np

    err = np.array([e is not None for e in errors], dtype=bool)
    ok_idx, err_idx = np.flatnonzero(~err), np.flatnonzero(err)
    rng = np.random.default_rng(opts.seed)
    if opts.sample is not None and len(ok_idx) > opts.sample:
        ok_idx = np.sort(rng.choice(ok_idx, opts.sample, replace=False))
    if len(err_idx) > opts.max_errors:
        # spread over kinds: the rarest kinds first, so a flood of one error hides no other
        kinds = Counter(error_kind(errors[i]) for i in err_idx)
        order = sorted(err_idx, key=lambda i: (kinds[error_kind(errors[i])], i))
        err_idx = np.sort(np.asarray(order[:opts.max_errors]))
    return ok_idx.tolist(), err_idx.tolist()


# -- finding images --------------------------------------------------------------------------

class ImageLocator:
    """row -> payload for images.load_rgb (a path or bytes), or None with a reason."""

    def __init__(self, output: Output, metadata: dict, image_root: Path | None = None):
        self.output = output
        self.source = (metadata.get("config") or {}).get("source") or {}
        self.kind = self.source.get("kind")
        self.image_root = Path(image_root) if image_root else None

    def locate(self, rows: list[dict]) -> list[tuple[bytes | str | None, str | None]]:
        try:
            if self.image_root is None and self.kind == "parquet":
                return self._parquet(rows)
            if self.image_root is None and self.kind == "hf":
                return self._hf(rows)
            if self.kind == "wds":
                return self._wds(rows)
            root = self.image_root or self._root(rows)
        except Exception as e:  # a moved or unreadable source: placeholders, not a crash
            why = f"source unavailable: {type(e).__name__}: {e}"[:200]
            return [(None, why)] * len(rows)
        out = []
        for r in rows:
            ref = r.get("image_ref") or ""
            if not ref:
                out.append((None, "no image reference"))
                continue
            p = Path(ref)
            out.append((str(p if p.is_absolute() else root / p), None))
        return out

    def _root(self, rows) -> Path:
        s = self.source
        if self.kind == "sample":
            from .sources import sample_dir

            return sample_dir()
        if self.kind == "folder":
            return Path(s.get("target") or ".")
        if self.kind == "coco":
            from .sources import _coco_image_root

            data_dir = s.get("data_dir") or s.get("target") or None
            ann = s.get("annotations") or str(Path(data_dir or ".") / "annotations.json")
            first = next((r["image_ref"] for r in rows if r.get("image_ref")), "")
            return _coco_image_root(data_dir, ann, [{"file_name": first}])
        return self.output.folder  # no metadata: refs relative to the output

    def _parquet(self, rows):
        import glob

        import pyarrow.parquet as pq

        from .sources import _payload_of

        files = sorted(glob.glob(self.source.get("target") or "", recursive=True))
        col = self.source.get("image_column") or "image"
        bounds, start = [], 0
        for f in files:
            n = pq.ParquetFile(f).metadata.num_rows
            bounds.append((start, start + n, f))
            start += n
        out: list = [(None, "row not in the source Parquet files")] * len(rows)
        by_file: dict[str, list[tuple[int, int]]] = {}
        for k, r in enumerate(rows):
            seq = r.get("seq")
            for lo, hi, f in bounds:
                if seq is not None and lo <= seq < hi:
                    by_file.setdefault(f, []).append((k, seq - lo))
        for f, items in by_file.items():
            src = Output(Path(f), (Path(f),))
            t = take(src, [i for _, i in items], [col])
            # take() returns ascending unique positions
            cells = dict(zip(sorted({i for _, i in items}), t.column(col).to_pylist()))
            for k, i in items:
                payload, _ = _payload_of(cells[i], Path(f).parent)
                out[k] = (payload, None if payload is not None else "no image in the row")
        return out

    def _hf(self, rows):
        import datasets

        target = self.source.get("target") or ""
        if not os.path.isdir(target):
            why = f"hub dataset {target}: not fetched (show works offline)"
            return [(None, why)] * len(rows)
        from .sources import _payload_of

        ds = datasets.load_from_disk(target)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[self.source.get("split") or "train"]
        col = self.source.get("image_column") or "image"
        if isinstance(ds.features.get(col), datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        out = []
        for r in rows:
            seq = r.get("seq")
            if seq is None or not 0 <= seq < len(ds):
                out.append((None, "row not in the dataset"))
                continue
            payload, _ = _payload_of(ds[int(seq)][col], Path(target))
            out.append((payload, None if payload is not None else "no image in the row"))
        return out


    def _wds(self, rows):
        """Members read back from their tars (image_ref TAR#MEMBER; with --image-root, TAR's
        file name under it), each tar's headers walked once until its members are found."""
        import tarfile

        out: list = [(None, "no image member")] * len(rows)
        wanted: dict[str, dict[str, list[int]]] = {}
        for k, r in enumerate(rows):
            tar, sep, member = (r.get("image_ref") or "").rpartition("#")
            if sep:
                if self.image_root is not None:
                    tar = str(self.image_root / Path(tar).name)
                wanted.setdefault(tar, {}).setdefault(member, []).append(k)
        for tar, members in wanted.items():
            left = dict(members)
            try:
                with tarfile.open(tar, "r:*") as tf:
                    for m in iter(tf.next, None):
                        tf.members = []
                        if left and m.name in left:
                            data = tf.extractfile(m).read()
                            for k in left.pop(m.name):
                                out[k] = (data, None)
                        if not left:
                            break
            except (tarfile.TarError, OSError, EOFError) as e:
                why = f"tar unavailable: {type(e).__name__}: {e}"[:200]
                for ks in left.values():
                    for k in ks:
                        out[k] = (None, why)
        return out


def thumbnail(payload, px: int) -> tuple[str | None, str | None]:
    """(data: URI of a small JPEG, None) or (None, why not)."""
    from .images import ImageError, load_rgb

    try:
        im = load_rgb(payload, max_side=px)
    except ImageError as e:
        return None, str(e)
    except Exception as e:  # a decoder bug costs one thumbnail
        return None, f"cannot decode: {type(e).__name__}"
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=72, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), None


def thumbnails(payloads, px: int, workers: int | None = None) -> list[tuple[str | None, str | None]]:
    # threads: Pillow releases the GIL while decoding and resizing. On the 2-core dev machine
    # (under other load) 200 640x480 JPEGs took 1.10 s serially, 0.56 s on 4 threads (best of 4)
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(payloads) < 4:
        return [thumbnail(p, px) for p in payloads]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda p: thumbnail(p, px), payloads))


# -- HTML ------------------------------------------------------------------------------------

CSS = """
:root{--fg:#1d2330;--mute:#5f6b7a;--line:#dde2e8;--bg:#f6f7f9;--err:#b42318;--errbg:#fef3f2}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header,main,nav{max-width:1280px;margin:0 auto;padding:0 16px}
header{padding-top:14px}
h1{font-size:20px;margin:0 0 2px}h2{font-size:16px;margin:18px 0 8px}
.sub{color:var(--mute);margin:0 0 10px;word-break:break-all}
.panels{display:flex;flex-wrap:wrap;gap:12px}
.panel{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 12px;flex:1 1 300px}
.panel h3{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--mute);margin:0 0 4px}
table.kv{border-collapse:collapse;width:100%}
.kv td{padding:1px 6px 1px 0;vertical-align:top}.kv td:first-child{color:var(--mute);white-space:nowrap}
.kv td:last-child{word-break:break-word}
.errs td,.errs th{padding:2px 8px 2px 0;text-align:left}.errs td.n{text-align:right}
.errs a{color:var(--err)}
nav.pages{margin:12px auto;display:flex;gap:4px;flex-wrap:wrap;align-items:center}
nav.pages a,nav.pages span{padding:2px 8px;border:1px solid var(--line);border-radius:6px;background:#fff;color:var(--fg);text-decoration:none}
nav.pages span.cur{background:var(--fg);color:#fff}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;overflow:hidden;display:flex;flex-direction:column}
.card.error{border-color:#f4c7c3}
.thumb{height:170px;background:#eceff3;display:flex;align-items:center;justify-content:center}
.thumb img{max-width:100%;max-height:170px;display:block}
.ph{color:var(--mute);font-size:12px;text-align:center;padding:8px;word-break:break-all}
.body{padding:8px 10px;display:flex;flex-direction:column;gap:4px}
.cap{font-size:14px;margin:0;word-break:break-word;max-height:7.4em;overflow:auto}
.cap.none{color:var(--mute);font-style:italic}
.refs{margin:0;padding-left:16px;color:var(--mute);font-size:12px}
.meta{color:var(--mute);font-size:12px;margin:0;word-break:break-all}
.msg{color:var(--err);background:var(--errbg);font-size:12px;margin:0;padding:2px 6px;border-radius:4px;word-break:break-word}
.tag{display:inline-block;padding:0 5px;border-radius:4px;background:#eef1f5;font-size:11px}
.tag.length{background:#fff4e5}
details.md pre{white-space:pre-wrap;word-break:break-all;font-size:11px;max-height:320px;overflow:auto}
h2.group{color:var(--err)}
footer{color:var(--mute);font-size:12px;text-align:center;padding:16px}
"""


def esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _kv(pairs) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in pairs
                   if v not in (None, ""))
    return f'<table class="kv">{rows}</table>'


def _fmt(v, digits=2):
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v


def _settings(md: dict) -> list[tuple[str, object]]:
    cfg = md.get("config") or {}
    eng, src = cfg.get("engine") or {}, cfg.get("source") or {}
    smp, pr = cfg.get("sampling") or {}, cfg.get("prompt") or {}
    ver = md.get("versions") or {}
    dataset = src.get("kind")
    if src.get("target"):
        dataset = f"{dataset}:{src['target']}"
    if src.get("data_dir") or src.get("annotations"):
        dataset = f"{dataset} ({src.get('data_dir') or ''} {src.get('annotations') or ''})"
    return [
        ("model", eng.get("model")),
        ("encoder", None if not eng else ("torch.compile" if eng.get("compile") else "eager")),
        ("max tiles", eng.get("max_dynamic_patch")),
        ("dataset", dataset),
        ("prompt", pr.get("prompt")), ("system prompt", pr.get("system_prompt")),
        ("sampling", None if not smp else
         f"max_tokens {smp.get('max_tokens')}, temperature {smp.get('temperature')}, "
         f"top_p {smp.get('top_p')}, seed {smp.get('seed')}"),
        ("batch size", cfg.get("batch_size")), ("shards", cfg.get("num_shards")),
        ("vLLM / torch", " / ".join(str(ver[k]) for k in ("vllm", "torch") if ver.get(k))),
        ("device", ver.get("device")),
        ("git", (md.get("git_sha") or "")[:12]), ("internvl-batch", md.get("internvl_batch")),
    ]


def _stats(st: dict | None, n_rows: int, n_files: int) -> list[tuple[str, object]]:
    if not st:
        return [("rows", _fmt(n_rows)), ("files", n_files), ("stats", "no stats.json found")]
    return [
        ("rows", _fmt(st.get("rows_in_output") or st.get("rows_in_shard") or n_rows)),
        ("files", n_files),
        ("captioned / errors", f"{_fmt(st.get('images'))} / {_fmt(st.get('errors'))}"),
        ("tokens in / out", f"{_fmt(st.get('input_tokens'))} / {_fmt(st.get('output_tokens'))}"),
        ("images/s", _fmt(st.get("images_per_s"))),
        ("output tok/s", _fmt(st.get("output_tokens_per_s"), 1)),
        ("generate / total s", f"{_fmt(st.get('generate_s'))} / {_fmt(st.get('total_s'))}"),
        ("GPU", st.get("gpu_name") or "none (CPU)"),
        ("compile cache", None if st.get("cache_hit") is None else
         ("hit" if st["cache_hit"] else "miss")),
    ]


def _scores_panel(output: Output) -> str:
    p = output.beside("scores.json")
    if not p.is_file():
        return ""
    try:
        doc = json.loads(p.read_text())
    except ValueError:
        return ""
    pairs = [(m, "unavailable" if v is None else f"{v:.4f}")
             for m, v in (doc.get("metrics") or {}).items()]
    pairs.append(("scored rows", f"{doc.get('scored')} of {doc.get('rows')}"))
    return f'<div class="panel"><h3>Scores (scores.json)</h3>{_kv(pairs)}</div>'


def _card(r: dict, thumb: tuple[str | None, str | None]) -> str:
    uri, why = thumb
    alt = esc(r.get("image_ref") or r.get("id"))
    img = (f'<img src="{uri}" alt="{alt}" loading="lazy">' if uri else
           f'<div class="ph">no image<br>{esc(why)}</div>')
    err = r.get("error")
    if r.get("caption") is not None:
        cap = f'<p class="cap">{esc(r["caption"])}</p>'
    else:  # an error row says why below
        cap = "" if err else '<p class="cap none">no caption</p>'
    refs = r.get("references") or []
    refs_html = ("<ol class=\"refs\">" + "".join(f"<li>{esc(x)}</li>" for x in refs) + "</ol>"
                 if refs else "")
    tags = []
    if r.get("tiles") is not None:
        tags.append(f'{r["tiles"]} tile{"s" if r["tiles"] != 1 else ""}')
    if r.get("prompt_tokens") is not None:
        tags.append(f'in {r["prompt_tokens"]} (image {r.get("image_tokens")})')
    if r.get("output_tokens") is not None:
        tags.append(f'out {r["output_tokens"]}')
    fr = r.get("finish_reason")
    tag_html = " ".join(f'<span class="tag">{esc(t)}</span>' for t in tags)
    if fr:
        tag_html += f' <span class="tag {"length" if fr == "length" else ""}">{esc(fr)}</span>'
    msg = f'<p class="msg">{esc(err)}</p>' if err else ""
    return (f'<article class="card{" error" if err else ""}" data-seq="{esc(r.get("seq"))}" '
            f'data-id="{esc(r.get("id"))}">'
            f'<div class="thumb">{img}</div><div class="body">{cap}{msg}{refs_html}'
            f'<p class="meta">{tag_html}</p>'
            f'<p class="meta">{esc(r.get("id"))} · seq {esc(r.get("seq"))}</p></div></article>')


def _page_name(base: Path, i: int) -> str:
    return base.name if i == 0 else f"{base.stem}-p{i + 1}{base.suffix}"


def _href(base: Path, i: int) -> str:
    """A link to page i, for an href: `#`, `?` or `%` in a file name would otherwise start a
    fragment or a query (`run#1-p2.html` pointed at `run`)."""
    return esc(quote(_page_name(base, i)))


def _nav(base: Path, i: int, n: int) -> str:
    if n <= 1:
        return ""
    items = []
    if i > 0:
        items.append(f'<a href="{_href(base, i - 1)}" rel="prev">‹ prev</a>')
    shown = sorted({0, n - 1, *range(max(0, i - 3), min(n, i + 4))})
    last = -1
    for k in shown:
        if k - last > 1:
            items.append("<span>…</span>")
        items.append(f'<span class="cur">{k + 1}</span>' if k == i else
                     f'<a href="{_href(base, k)}">{k + 1}</a>')
        last = k
    if i < n - 1:
        items.append(f'<a href="{_href(base, i + 1)}" rel="next">next ›</a>')
    return f'<nav class="pages">page {i + 1} of {n}: {"".join(items)}</nav>'


def build(output: Output, out: Path | None = None, opts: GalleryOptions = GalleryOptions(),
          log=lambda s: None) -> list[Path]:
    """Write the gallery's page files; return their paths, first page first."""
    errors = output.read(["error"]).column("error").to_pylist()
    n_rows = len(errors)
    kinds_all = Counter(error_kind(e) for e in errors if e is not None)
    ok_rows, err_rows, kind_order = _shown_rows(output, errors, kinds_all, opts)
    shown = ok_rows + err_rows
    md = output.metadata()
    log(f"show: {len(ok_rows)} captioned + {len(err_rows)} error rows of {n_rows:,}; "
        f"making thumbnails")
    payloads = ImageLocator(output, md, opts.image_root).locate(shown)
    thumbs = thumbnails([p for p, _ in payloads], opts.thumb_px, opts.workers)
    thumbs = [t if p is not None else (None, why)
              for t, (p, why) in zip(thumbs, payloads)]

    base = Path(out) if out else output.beside("gallery.html")
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {base}: {e.strerror or e}") from None
    layout = _Layout(base, max(1, opts.page_size), len(ok_rows), err_rows, kinds_all, kind_order)
    n_err = sum(kinds_all.values())
    n_ok = n_rows - n_err
    sample_note = (f"{len(ok_rows):,} of {n_ok:,} captioned rows shown"
                   + (f" (a sample, seed {opts.seed})" if len(ok_rows) < n_ok else "")
                   + (f"; {len(err_rows):,} of {n_err:,} error rows" if n_err
                      else "; no error rows"))
    header = _header(output, md, n_rows, sample_note)
    pages = []
    n_pages = max(1, -(-len(shown) // layout.size))
    for i in range(n_pages):
        lo, hi = i * layout.size, min(len(shown), (i + 1) * layout.size)
        body = _page_body(shown, thumbs, lo, hi, layout)
        doc = _page_html(output, header, layout.error_summary(i), body, i, n_pages, base,
                         lo, hi, len(shown))
        path = base.with_name(_page_name(base, i))
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(doc, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:  # a read-only or full folder: one line, no half page left
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        pages.append(path)
    return pages


def _shown_rows(output: Output, errors: list, kinds_all: Counter, opts: GalleryOptions):
    """(captioned rows in dataset order, error rows grouped by kind, most common kind first,
    the kinds in that order): only the chosen rows are read."""
    ok_idx, err_idx = choose(errors, opts)
    rows = take(output, ok_idx + err_idx, COLUMNS).to_pylist()  # shard 0's rows, then 1's...
    # dataset order: shards deal rows out round-robin, seq puts them back together
    ok_rows = sorted((r for r in rows if r["error"] is None), key=lambda r: r["seq"] or 0)
    err_rows = [r for r in rows if r["error"] is not None]
    kind_order = sorted(kinds_all, key=lambda k: (-kinds_all[k], k))
    err_rows.sort(key=lambda r: (kind_order.index(error_kind(r["error"])), r["seq"] or 0))
    return ok_rows, err_rows, kind_order


class _Layout:
    """Where each error kind's cards start (summary links go to that page and anchor)."""

    def __init__(self, base: Path, size: int, n_ok: int, err_rows: list[dict],
                 kinds_all: Counter, kind_order: list[str]):
        self.base, self.size, self.n_ok = base, size, n_ok
        self.kinds_all, self.kind_order = kinds_all, kind_order
        self.first_at: dict[str, int] = {}
        for pos, r in enumerate(err_rows, start=n_ok):
            self.first_at.setdefault(error_kind(r["error"]), pos)
        self.kind_id = {k: f"err-{j + 1}" for j, k in enumerate(kind_order)}
        self.shown_per_kind = Counter(error_kind(r["error"]) for r in err_rows)

    def error_summary(self, page_index: int) -> str:
        if not self.kinds_all:
            return ""
        trs = []
        for k in self.kind_order:
            if k in self.first_at:
                page = self.first_at[k] // self.size
                href = _href(self.base, page) if page != page_index else ""
                link = f'<a href="{href}#{self.kind_id[k]}">{esc(k)}</a>'
            else:
                link = esc(k)
            trs.append(f'<tr><td>{link}</td><td class="n">{self.kinds_all[k]:,}</td>'
                       f'<td class="n">{self.shown_per_kind.get(k, 0):,}</td></tr>')
        return ('<div class="panel"><h3>Errors by kind</h3><table class="errs">'
                '<tr><th>kind</th><th>rows</th><th>shown</th></tr>'
                + "".join(trs) + "</table></div>")


def _page_body(shown: list[dict], thumbs: list, lo: int, hi: int, layout: _Layout) -> str:
    """The cards of rows lo..hi-1, under a heading per section (captions, each error kind)."""
    body, cur_kind, in_grid = [], None, False
    for pos in range(lo, hi):
        r = shown[pos]
        heading = None
        if pos < layout.n_ok:
            if pos == lo:
                heading = ('<h2 id="captions">Captions' +
                           (" (continued)" if pos > 0 else "") + "</h2>")
        else:
            k = error_kind(r["error"])
            if k != cur_kind:
                first = layout.first_at[k]
                cont = " (continued)" if first < pos and pos == lo else ""
                anchor = f' id="{layout.kind_id[k]}"' if first == pos else ""
                heading = (f'<h2 class="group"{anchor} data-kind="{esc(k)}">'
                           f'{esc(k)}{cont} <small>({layout.kinds_all[k]:,} rows)</small></h2>')
                cur_kind = k
        if heading:
            if in_grid:
                body.append("</section>")
            body.append(heading + '<section class="grid">')
            in_grid = True
        body.append(_card(r, thumbs[pos]))
    if in_grid:
        body.append("</section>")
    if not shown:
        body.append("<p>No rows.</p>")
    return "".join(body)


def _header(output: Output, md: dict, n_rows: int, sample_note: str) -> dict:
    """What every page repeats at its top."""
    return {"title": f"internvl-batch: {output.path.name or output.path}",
            "settings": _kv(_settings(md)),
            "stats": _kv(_stats(output.stats(), n_rows, len(output.files))),
            "sample_note": sample_note,
            "md_json": esc(json.dumps(md, indent=2, default=str))}


def _page_html(output: Output, h: dict, err_summary: str, body: str, i: int, n_pages: int,
               base: Path, lo: int, hi: int, n_shown: int) -> str:
    nav = _nav(base, i, n_pages)
    title = h["title"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(title)}{f" (page {i + 1})" if i else ""}</title>
<style>{CSS}</style></head>
<body><header><h1>{esc(title)}</h1>
<p class="sub">{esc(output.path)} · {esc(h["sample_note"])}</p>
<div class="panels"><div class="panel"><h3>Run</h3>{h["settings"]}</div>
<div class="panel"><h3>Stats</h3>{h["stats"]}</div>{_scores_panel(output)}{err_summary}</div>
<details class="md"><summary>all run metadata</summary><pre>{h["md_json"]}</pre></details>
</header>
{nav}<main>{body}</main>{nav}
<footer>internvl-batch show · rows {lo + 1}–{hi} of {n_shown} shown</footer>
</body></html>
"""
