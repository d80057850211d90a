"""Outputs written the way a run writes them (sinks.ShardWriter, stats.write, merge), with
made-up captions, for the show/score tests."""
from __future__ import annotations

from pathlib import Path

from internvl_batch import stats as stats_mod
from internvl_batch.sinks import ShardWriter


def row(seq: int, ref: str, caption: str | None = "a caption", references=("a reference",),
        error: str | None = None, **kw) -> dict:
    ok = error is None
    r = {"id": kw.pop("id", f"img-{seq}"), "seq": seq, "image_ref": ref,
         "references": list(references), "prompt": "Describe this image in one sentence.",
         "caption": caption if ok else None,
         "prompt_tokens": 283 if ok else None, "image_tokens": 256 if ok else None,
         "tiles": 1 if ok else None, "output_tokens": 9 if ok else None,
         "finish_reason": "stop" if ok else None, "error": error}
    r.update(kw)
    return r


def metadata(source: dict, **kw) -> dict:
    cfg = {"source": {"kind": "folder", "target": "", "data_dir": None, "annotations": None,
                      "split": "train", "image_column": "image", "caption_column": None,
                      "id_column": None, "limit": None, **source},
           "engine": {"model": "preset:tiny", "compile": False, "max_dynamic_patch": None},
           "prompt": {"prompt": "Describe this image in one sentence.", "system_prompt": None},
           "sampling": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 0},
           "batch_size": 8, "num_shards": kw.pop("num_shards", 1)}
    return {"internvl_batch": "0.1.0", "config": cfg,
            "versions": {"vllm": "test", "torch": "test", "device": "cpu"},
            "git_sha": "test", **kw}


def write_output(out: Path, rows: list[dict], meta: dict, shards: int = 1) -> Path:
    """Rows dealt to `shards` shards by seq (as a run does), each finalized with its stats;
    with several shards, merged (stats.json) like `internvl-batch merge`."""
    out = Path(out)
    for i in range(shards):
        mine = [r for r in rows if r["seq"] % shards == i]
        w = ShardWriter(out, i, shards).open()
        for k in range(0, len(mine), 8192):
            w.write(mine[k:k + 8192])
        st = stats_mod.RunStats()
        for r in mine:
            st.add_row(error=r["error"], answered=r["error"] is None,
                       prompt_tokens=r["prompt_tokens"] or 0,
                       image_tokens=r["image_tokens"] or 0,
                       output_tokens=r["output_tokens"] or 0)
        st.generate_s = 1.0
        runs = [st.to_dict()]
        n = w.finalize(dict(meta, shard=i))
        stats_mod.write(w.stats_path, stats_mod.summarize(runs), runs,
                        {"shard": w.name, "rows_in_shard": n, "complete": True})
        w.commit()
    if shards > 1:
        from internvl_batch.merge import merge_output

        ok, report = merge_output(out)
        assert ok, report
    return out
