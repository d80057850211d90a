"""Tables and the reproduction report for `bench` results.

    python -m internvl_batch.bench.report results/a.json results/b.json --out results

writes OUT/REPRODUCE.md (device, versions, command lines, one table per configuration with
median and min-max per variant, ratios, % of roofline, the comparison with vLLM PR #38049) and
OUT/reproduce.png (the paired ratios, compiled/eager and pipeline/plain, one point per config,
min-max error bars).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PR_URL = "https://github.com/vllm-project/vllm/pull/38049"
PR_GAINS = {"requests_per_s": 4.3, "output_tokens_per_s": 3.8}
CPU_BANNER = "**CPU run — NOT the headline numbers.**"


def num(v, digits: int = 2) -> str:
    """2 decimals below 100, 1 decimal and thousands separators from 100 up."""
    if v is None:
        return "n/a"
    v = float(v)
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.{digits}f}"


def mmm(s: dict | None, digits: int = 2) -> str:
    """'median (min–max)', all three with the median's precision."""
    if not s or s.get("median") is None:
        return "n/a"
    d = 1 if abs(s["median"]) >= 100 else digits
    f = lambda x: f"{float(x):,.{d}f}"  # noqa: E731
    return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def pct(r: float | None) -> str:
    return "n/a" if r is None else f"{(r - 1) * 100:+.1f} %"


def ratio_cell(s: dict | None) -> str:
    """'1.079 (+7.9 %), per repeat 1.050–1.100'."""
    if not s or s.get("median") is None:
        return "n/a"
    return f"{s['median']:.3f} ({pct(s['median'])}), per repeat {s['min']:.3f}–{s['max']:.3f}"


def is_cpu(doc: dict) -> bool:
    return not doc.get("device", {}).get("cuda")


def title(doc: dict) -> str:
    c = doc["config"]
    mdp = c.get("max_dynamic_patch")
    return (f"{doc['name']}: {c['model']}, {c['images']} images/repeat ({c['sizes']}"
            f"{', max_dynamic_patch ' + str(mdp) if mdp else ''}), {c['max_tokens']} output "
            f"tokens, {c['repeats']} repeats after {c['warmup_images']} warm-up images")


def variant_table(doc: dict) -> str:
    head = ("| variant | requests/s median (min–max) | output tok/s median (min–max) | "
            "s/repeat median | tiles/image | % roofline median (min–max) | GPU busy % median | "
            "engine init s | compile cache |")
    lines = [head, "|" + "---|" * 9]
    for v, d in doc["variants"].items():
        s = d["summary"]
        init = (d.get("init") or {}).get("total_s")
        hit = d.get("cache_hit")
        roof = "n/a" if is_cpu(doc) else mmm(s.get("roofline_pct"), 1)
        lines.append(
            f"| {v} | {mmm(s.get('requests_per_s'))} | {mmm(s.get('output_tokens_per_s'))} | "
            f"{num((s.get('seconds') or {}).get('median'), 3)} | "
            f"{num((s.get('tiles_per_image') or {}).get('median'))} | {roof} | "
            f"{num((s.get('gpu_busy_pct') or {}).get('median'), 1)} | {num(init, 1)} | "
            f"{'-' if hit is None else ('hit' if hit else 'miss')} |")
    return "\n".join(lines)


def ratio_table(doc: dict) -> str:
    if not doc.get("ratios"):
        return ""
    lines = ["| ratio | requests/s | output tok/s |", "|---|---|---|"]
    for k, r in doc["ratios"].items():
        lines.append(f"| {k} | {ratio_cell(r.get('requests_per_s'))} | "
                     f"{ratio_cell(r.get('output_tokens_per_s'))} |")
    return "\n".join(lines)


def captions_line(doc: dict) -> str:
    """'Captions of the 512 warm-up images, compared with plain: compiled 512/512 ...'."""
    c = doc.get("captions") or {}
    if not c.get("variants"):
        return ""
    where = "warm-up images" if c.get("slice") == "warmup" else "images of repeat 0"
    parts = [f"{v} {d['identical']}/{d['compared']} identical "
             f"(mean common prefix {num(d['mean_common_prefix_pct'], 1)} %)"
             for v, d in c["variants"].items()]
    return (f"Captions (greedy) of the {c['images']} {where}, compared with {c['reference']}'s: "
            + "; ".join(parts) + ".")


def device_line(doc: dict) -> str:
    d, v = doc["device"], doc["versions"]
    peak = d.get("matmul_bf16_tflops")
    return (f"Device: {d['name']} · vLLM {v.get('vllm')} · torch {v.get('torch')} · "
            f"bf16 8192³ matmul: {num(peak, 1) + ' TFLOP/s' if peak else 'n/a'}")


def results_markdown(doc: dict) -> str:
    """The per-results-file Markdown (results/<name>.md)."""
    out = [f"## {title(doc)}", ""]
    if is_cpu(doc):
        out += [f"> {CPU_BANNER}", ""]
    out += [device_line(doc), "", variant_table(doc), ""]
    rt = ratio_table(doc)
    if rt:
        out += ["Ratios: median of per-repeat ratios (repeat k of both variants ran on the "
                "same images), with their range.", "", rt, ""]
    cap = captions_line(doc)
    if cap:
        out += [cap, ""]
    notes = list(doc["config"].get("notes") or [])
    if "pipeline-fp8" in doc["variants"]:
        notes.append("pipeline-fp8: vLLM's online FP8 for InternViT's and the language "
                     "model's linear layers; every other variant runs the checkpoint's bf16, "
                     "so its caption agreement is FP8's against bf16.")
    pipe = doc["variants"].get("pipeline")
    if pipe and pipe["repeats"] and all("pipeline_generate_s" in r for r in pipe["repeats"]):
        outside = [r["seconds"] - r["pipeline_generate_s"] for r in pipe["repeats"]]
        med = sorted(outside)[len(outside) // 2]
        notes.append(f"pipeline: {num(med, 2)} s of each repeat (median) lies outside its "
                     "generate calls: decode-pool start, waiting for the first decoded batch, "
                     "Parquet finalize and stats; a fixed cost per run that a large dataset "
                     "amortizes.")
    out += [f"- {n}" for n in notes]
    out += ["", f"Command: `{doc.get('command')}`", ""]
    return "\n".join(out)


def pr_sentence(docs: list[dict]) -> str:
    base = (f"vLLM PR #38049 ({PR_URL}) reported +{PR_GAINS['requests_per_s']} % requests/s "
            f"and +{PR_GAINS['output_tokens_per_s']} % output tok/s from compiling the InternViT "
            "encoder (`compile_mm_encoder`), InternVL3-2B on an H100 served online "
            "(`vllm bench serve`, VisionArena-Chat, 1000 prompts, real weights).")
    found = []
    for d in docs:
        r = d.get("ratios", {}).get("compiled/eager")
        if not r:
            continue
        q, t = r["requests_per_s"], r["output_tokens_per_s"]
        es = d["variants"]["eager"]["summary"]
        tiles = (es.get("tiles_per_image") or {}).get("median")
        busy = (es.get("gpu_busy_pct") or {}).get("median")
        found.append(f"{d['name']} ({d['device']['name']}; {num(tiles, 1)} tiles per image, "
                     f"GPU busy {'n/a' if busy is None else f'{busy:.0f} %'} during the eager runs): "
                     f"{pct(q['median'])} requests/s "
                     f"(per repeat {pct(q['min'])} … {pct(q['max'])}) and "
                     f"{pct(t['median'])} output tok/s")
    if not found:
        return (base + " These results have no compiled variant (the compiled encoder needs "
                "CUDA), so they cannot be compared with it.")
    return (base + " Here, offline `LLM.generate` with dummy weights and exactly "
            "`--max-tokens` output tokens, compiled/eager gives " + "; ".join(found) + ". "
            "Compiling speeds up only the encoder's GPU time: a run whose GPU sits idle while "
            "the calling process prepares requests (low GPU busy %) cannot show it, and the "
            "encoder's share of the GPU's work grows with the tiles per image.")


def reproduce_markdown(docs: list[dict], png_name: str | None = "reproduce.png") -> str:
    cpu = any(is_cpu(d) for d in docs)
    out = ["# Reproducing the benchmark", ""]
    if cpu:
        out += [f"> {CPU_BANNER} `make reproduce` found no GPU (`nvidia-smi` failed) and ran a "
                "small configuration with the tiny synthesized model, so the code path is "
                "exercised end to end; the throughput below says nothing about InternVL on a "
                "GPU. Run `make reproduce` on a GPU host for the headline numbers.", ""]
    devices = sorted({device_line(d) for d in docs})
    out += ["Generated by `make reproduce` (`internvl-batch bench`, then "
            "`python -m internvl_batch.bench.report`).", ""] + [f"- {x}" for x in devices]
    shas = sorted({d["versions"].get("git_sha") or "unknown" for d in docs})
    out += [f"- internvl-batch {docs[0]['versions'].get('internvl_batch')}, git {', '.join(shas)}",
            "", "Commands:", "", "```"] + [d.get("command") or "" for d in docs] + ["```", ""]
    out += ["## Method", "",
            "- Each variant has its own process and vLLM engine; all stay alive with an equal "
            "share of GPU memory, and the parent runs one at a time, rotating the order every "
            "round, after a warm-up on separate images.",
            "- Every repeat uses its own images (repeat k is the same image set for every "
            "variant): vLLM's multimodal processor cache keys on pixels, so reused images would "
            "skip preprocessing. Ratios are per repeat, then median and range.",
            "- `eager` / `compiled`: one `LLM.generate` over images decoded before the clock "
            "(engine throughput). `plain`: `internvl_batch/bench/plain.py`, a user's script whose "
            "serial `PIL.Image.open().convert()` loop is inside the clock. `pipeline`: "
            "`pipeline.run` end to end (decode workers, batches, Parquet, stats.json).",
            "- Requests and tokens are counted from vLLM's outputs; `ignore_eos` makes every "
            "request decode exactly the same number of tokens.",
            "- % roofline = achieved FLOP/s ÷ a measured bf16 8192³ `torch.matmul` rate on the "
            "same GPU. FLOPs: InternViT per tile (≈0.727 TFLOP for InternViT-300M at 448 px: "
            "24 × [2·1025·(4·1024² + 2·1024·4096) + 4·1025²·1024] + patch embedding + "
            "projector) × tiles counted from image tokens ÷ 256, plus LM prefill 2·P·prompt "
            "tokens and decode 2·(P + lm_head)·output tokens (P = LM parameters without "
            "embeddings), plus attention.", ""]
    for d in docs:
        out += [results_markdown(d)]
    out += ["## Compared with vLLM PR #38049", "", pr_sentence(docs), ""]
    if png_name:
        out += [f"![compiled/eager and pipeline/plain ratios per configuration]({png_name})", ""]
    return "\n".join(out)


def short_label(doc: dict, with_replicas: bool = False) -> str:
    """'InternVL3-1B / 448 px, 1.0 tiles / 4 replicas' over three lines, for the x axis."""
    c = doc["config"]
    model = c["model"].split(":")[-1].upper().replace("INTERNVL", "InternVL")  # InternVL3-1B
    tiles = None
    for v in doc["variants"].values():
        tiles = (v["summary"].get("tiles_per_image") or {}).get("median") or tiles
    size = "448 px" if c["sizes"] == "448" else "COCO"
    lines = [model, f"{size}, {num(tiles, 1)} tiles"]
    if with_replicas:
        lines.append(f"{(c.get('pipeline') or {}).get('replicas') or 1} repl., "
                     f"{c['images']}/rep")
    return "\n".join(lines)


def plot(docs: list[dict], path: Path) -> Path:
    """Two panels of paired ratios (median of per-repeat ratios, min-max bars): compiled vs
    eager encoder, with the PR's +4.3 % for scale, and internvl-batch vs the plain script."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("compiled/eager", "compiled ÷ eager encoder (one engine)", "#1f77b4"),
              ("pipeline/plain", "internvl-batch run path ÷ plain vLLM script", "#2ca02c")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=100)
    for ax, (key, name, color) in zip(axes, panels):
        rows = [(d, d["ratios"][key]["requests_per_s"]) for d in docs
                if key in d.get("ratios", {})]
        ax.set_title(name, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
        if not rows:
            ax.text(0.5, 0.5, "not measured in these results", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="#777777")
            ax.set_xticks([])
            continue
        meds = [r["median"] for _, r in rows]
        err = [[r["median"] - r["min"] for _, r in rows], [r["max"] - r["median"] for _, r in rows]]
        xs = list(range(len(rows)))
        # points, not bars: a ratio's baseline is 1, not 0
        ax.errorbar(xs, meds, yerr=err, fmt="o", capsize=5, color=color, ms=7, elinewidth=1.2)
        for x, m in zip(xs, meds):
            ax.annotate(f"{m:.2f}×", (x, m), xytext=(9, 0), textcoords="offset points",
                        ha="left", va="center", fontsize=8)
        ax.axhline(1.0, color="black", lw=0.8)
        if key == "compiled/eager":
            pr = 1 + PR_GAINS["requests_per_s"] / 100
            ax.axhline(pr, color="#d62728", lw=1, ls="--",
                       label=f"vLLM PR #38049: +{PR_GAINS['requests_per_s']} %")
            ax.legend(fontsize=8, frameon=False, loc="upper left")
            ax.set_ylim(min(0.85, min(r["min"] for _, r in rows) - 0.03),
                        max(1.12, max(r["max"] for _, r in rows) + 0.04))
        else:
            ax.set_ylim(0, max(r["max"] for _, r in rows) * 1.15)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xticks(xs)
        ax.set_xticklabels([short_label(d, key.startswith("pipeline")) for d, _ in rows],
                           fontsize=7)
        ax.set_ylabel("requests/s ratio (median, min–max)", fontsize=9)
    devices = ", ".join(sorted({d["device"]["name"] for d in docs}))
    return save_figure(fig, path, f"internvl-batch bench · {devices}",
                       cpu=any(is_cpu(d) for d in docs))


def save_figure(fig, path: Path, title: str, cpu: bool) -> Path:
    """Title (a CPU run is marked in red: its numbers are not the GPU's), save, close."""
    import matplotlib.pyplot as plt

    fig.suptitle(("CPU run — NOT a GPU measurement · " if cpu else "") + title, fontsize=10,
                 color="#b00000" if cpu else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# A REPRODUCE.md may open with a hand-written lead (results/h100: the encoder benchmark)
# ending at this line; regenerating keeps it and rewrites only what follows.
LEAD_END = "<!-- end of the lead; everything below is written by internvl_batch.bench.report -->"


def reproduce(files: list[Path], out_dir: Path) -> tuple[Path, Path]:
    docs = [json.loads(Path(f).read_text()) for f in files]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(docs, out_dir / "reproduce.png")
    md = out_dir / "REPRODUCE.md"
    prev = md.read_text() if md.is_file() else ""
    lead = prev.split(LEAD_END)[0] + LEAD_END + "\n\n" if LEAD_END in prev else ""
    md.write_text(lead + reproduce_markdown(docs, png.name))
    return md, png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m internvl_batch.bench.report",
                                 description="Write REPRODUCE.md and reproduce.png from bench "
                                             "results JSON files.")
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results"))
    a = ap.parse_args(argv)
    missing = [str(f) for f in a.results if not f.is_file()]
    if missing:
        print(f"no such results file: {', '.join(missing)}", file=sys.stderr)
        return 2
    md, png = reproduce(a.results, a.out)
    print(f"wrote {md} and {png} ({png.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
