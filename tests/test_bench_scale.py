"""The scale benchmark (bench/scale.py), run tiny: every figure of its table is measured.
The real run (a million records, ~20 minutes) is not part of the suite."""
from __future__ import annotations

import json

from internvl_batch.bench import scale


def test_scale_benchmark_measures_every_field(tmp_path):
    doc = scale.run_all(tmp_path / "work", records=2_000, small=300, coco=200, shards=8,
                        workers=1, log=lambda m: None)
    t = doc["table"]
    numbers = ["feed_images_per_s", "feed_cpu_ms_per_image", "feed_images_per_core_s",
               "cores_for_8_h100", "resume_first_row_s_small", "resume_first_row_s_large",
               "index_s_small", "index_s_large", "rows_per_s_large", "finalize_s_large",
               "merge_s", "merge_peak_rss_gb", "merge_compact_s", "merge_compact_peak_rss_gb",
               "bytes_per_row_tiny", "bytes_per_row_coco"]
    for k in numbers:
        assert isinstance(t[k], (int, float)) and t[k] > 0, k
    assert isinstance(t["main_rss_growth_pct"], float)
    assert [n for n, _ in t["main_rss_gb_during_large"]][:1] == [1_056]  # sampled at 1,000+
    assert all(gb > 0 for _, gb in t["main_rss_gb_during_large"])
    assert t["cores_for_8_h100"] == round(8 * 380 / t["feed_images_per_core_s"], 1)
    # the stopped runs wrote at least what they were asked to, the resumed ones finished
    assert t["resume_rows_small"] >= 300 and t["resume_rows_large"] >= 2_000
    large = doc["resume_large"]
    assert large["stopped"]["code"] == 75 and large["resumed"]["code"] == 0
    assert doc["resume_large"]["rows_in_shard"] == 2_000 + scale.EXTRA
    assert t["merge_shards"] == 8 and t["merge_rows"] == 2_000 + scale.EXTRA
    keys = ("peak_rss_gb_small", "peak_rss_gb_large", "peak_rss_gb_resume_small",
            "peak_rss_gb_resume_large")
    for key in keys:
        assert t[key]["main"] > 0 and all(gb > 0 for gb in t[key].values()), key
    # /proc is polled every 0.2 s: a short run's decode workers can come and go unseen, the
    # long ones' cannot
    assert any(t[key].get("decode worker", 0) > 0 for key in keys), t
    assert doc["feed"]["images"] == 200 and doc["feed"]["errors"] == 0
    doc["command"], doc["host"] = "python -m internvl_batch.bench.scale …", {"cpus": 2}
    scale.write(tmp_path / "result", doc)
    assert json.loads((tmp_path / "result" / "scale.json").read_text())["table"] == t
    readme = (tmp_path / "result" / "README.md").read_text()
    assert "python -m internvl_batch.bench.scale …" in readme and "| merge, 8 shards" in readme
