#!/usr/bin/env python3
"""The curation experiment: does recaptioning and reinforcing a dataset train a better CLIP?

One command, offline, on shapeworld (where the truth is known):

  1. `recap synth` draws a training world and a held-out world (other seed);
  2. `recap synth serve` serves the training world on loopback and `recap run pipelines/reinforce.yaml`
     downloads it into reinforced shards (synthetic captions from the fixture captioner, the two
     fixture teachers' embeddings of the original and >= 10 augmented views and of every caption);
  3. `recap train` trains the same tiny student on the same number of samples in four arms:
       a  alt-text        alt-text only, plain CLIP loss
       b  clip-filtered   alt-text, the top 30% of rows by CLIP score (DataComp's recipe)
       c  synthetic       a synthetic caption with p = 0.8, else the alt-text (Recap-DataComp's mix)
       d  reinforced      as c, trained by distillation from the stored teacher embeddings
                          (MobileCLIP's loss with lambda = 1, each teacher at its own logit scale)
     with zero-shot accuracy on the held-out world every few steps (the learning curve);
  4. per arm and seed: `recap eval` (zero-shot, retrieval), `recap eval --dense` (training-free
     MaskCLIP segmentation), and `recap finetune` of segmentation and depth heads with the encoder
     frozen and fully finetuned, on all the dense labels and on 10% of them;
  5. writes RESULTS.md (mean +- std over seeds), results.json (every number, per seed) and
     learning_curves.svg into the work directory.

Every step is skipped when its output is complete, so an interrupted run continues where it
stopped; --fresh starts over. Sizes: --quick (under 15 minutes on 2 cores) and --full (the
README's table, a few hours on 2 cores).

Usage: python3 tools/experiment.py [--quick | --full] [--work DIR] [--recap BIN] [--seeds N]
Only the standard library is needed. Set RECAP_BIN or --recap to use a given build; otherwise
target/release/recap (built by `cargo build --release --no-default-features --bin recap`).
"""

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    "quick": dict(world=600, heldout=300, rows_per_shard=150, views=10, captions=5, steps=300, batch=32,
                  eval_every=50, ft_steps=100, ft_batch=16, seeds=3),
    "full": dict(world=4000, heldout=1000, rows_per_shard=500, views=10, captions=5, steps=3000, batch=64,
                 eval_every=250, ft_steps=1000, ft_batch=16, seeds=3),
}

TEACHERS = ["models/shapeworld-clip-a", "models/shapeworld-clip-b"]


def teacher_logit_scale(model_dir):
    """exp(logit_scale) of a Hugging Face CLIP's model.safetensors (a float32 scalar)."""
    path = ROOT / model_dir / "model.safetensors"
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        meta = header["logit_scale"]
        if meta["dtype"] != "F32":
            raise SystemExit(f"{path}: logit_scale is {meta['dtype']}, expected F32")
        start, end = meta["data_offsets"]
        f.seek(8 + n + start)
        (v,) = struct.unpack("<f", f.read(end - start)[:4])
    return math.exp(v)


def arms():
    scales = ", ".join(f"{teacher_logit_scale(t):.2f}" for t in TEACHERS)
    return [
        ("a", "alt-text", "alt-text only",
         ["data.synthetic_prob=0", "loss.distill_weight=0"]),
        ("b", "clip-filtered", "alt-text, top 30% by CLIP score (DataComp)",
         ["data.synthetic_prob=0", "loss.distill_weight=0", "data.clip_score_top_fraction=0.3"]),
        ("c", "synthetic", "synthetic captions, p = 0.8 (Recap-DataComp)",
         ["data.synthetic_prob=0.8", "loss.distill_weight=0"]),
        ("d", "reinforced", "synthetic p = 0.8 + distillation from the stored embeddings (MobileCLIP)",
         ["data.synthetic_prob=0.8", "loss.contrastive_weight=0", "loss.distill_weight=1",
          f"loss.teacher_scales=[{scales}]"]),
    ]


# The dense probe: a linear head per patch token (it measures the features rather than a decoder's
# capacity) at a learning rate that fits it in the steps given; in mode full the encoder trains
# at a tenth of the head's rate.
HEAD = ["head.kind=linear", "optim.lr=1e-2", "optim.encoder_lr=1e-3", "optim.warmup_steps=20"]

# Dense finetunes per student: (task, mode, label fraction).
FINETUNES = [(task, mode, frac) for frac in (1.0, 0.1) for task in ("segmentation", "depth") for mode in ("frozen", "full")]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Runner:
    def __init__(self, recap, work):
        self.recap = recap
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def __call__(self, name, args, capture=False):
        """Run recap with args; its output goes to logs/NAME.log. Returns stdout when capture."""
        logf = self.logs / f"{name}.log"
        t = time.time()
        with open(logf, "w") as out:
            p = subprocess.run([str(self.recap)] + [str(a) for a in args], cwd=ROOT,
                               stdout=subprocess.PIPE if capture else out, stderr=out if capture else subprocess.STDOUT,
                               text=True)
        if p.returncode != 0:
            tail = logf.read_text()[-3000:]
            raise SystemExit(f"recap {' '.join(map(str, args[:2]))} failed (exit {p.returncode}); log {logf}:\n{tail}")
        if capture:
            with open(logf, "a") as out:
                out.write(p.stdout)
        return p.stdout if capture else time.time() - t


def done(path):
    return (path / ".done").is_file()


def mark(path, info=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / ".done").write_text(json.dumps(info or {}))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_data(run, work, size):
    for name, count, seed in (("world", size["world"], 1), ("heldout", size["heldout"], 2)):
        d = work / name
        if not done(d):
            if d.exists():
                shutil.rmtree(d)
            log(f"recap synth {name}: {count} samples, seed {seed}")
            run(f"synth-{name}", ["synth", "--out", d, "--count", count, "--seed", seed,
                                  "--min-size", "160x120", "--max-size", "640x480", "--png-fraction", "0.1"])
            mark(d)
    shards = work / "shards"
    if not done(shards):
        if shards.exists():
            shutil.rmtree(shards)
        port = free_port()
        serve_log = work / "logs" / "serve.log"
        server = subprocess.Popen([str(run.recap), "synth", "serve", str(work / "world"), "--port", str(port)],
                                  cwd=ROOT, stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
        try:
            for _ in range(200):
                if "serving" in serve_log.read_text():
                    break
                if server.poll() is not None:
                    raise SystemExit(f"recap synth serve exited: {serve_log.read_text()[-2000:]}")
                time.sleep(0.05)
            log(f"recap run pipelines/reinforce.yaml: {size['captions']} captions, {size['views']} views per image")
            secs = run("run", ["run", "pipelines/reinforce.yaml", "--no-progress",
                               "--set", f"input.path={work / 'world' / 'urls.parquet'}",
                               "--set", f"input.rows_per_shard={size['rows_per_shard']}",
                               "--set", f"output.path={shards}",
                               "--set", f"caption.num_captions={size['captions']}",
                               "--set", f"score.augmentations={size['views']}"])
        finally:
            server.terminate()
            server.wait()
        mark(shards, {"seconds": secs})
    return shards


def train_arm(run, work, size, shards, arm, seed):
    key, name, _, sets = arm
    out = work / "students" / f"{key}-{name}" / f"seed{seed}"
    if not done(out):
        log(f"recap train: arm {key} ({name}), seed {seed}, {size['steps']} steps of {size['batch']}")
        run(f"train-{key}-{seed}", ["train", "pipelines/train-tiny.yaml", "--no-progress", "--resume",
                                    "--set", f"data.shards={shards}", "--set", f"output.dir={out}",
                                    "--set", f"train.steps={size['steps']}", "--set", f"train.batch_size={size['batch']}",
                                    "--set", f"train.seed={seed}", "--set", f"train.eval_every={size['eval_every']}",
                                    "--set", f"train.checkpoint_every={size['steps']}",
                                    "--set", f"data.eval_set={work / 'heldout' / 'eval.parquet'}"]
            + [x for s in sets for x in ("--set", s)])
        mark(out)
    return out


def evaluate(run, work, size, student, tag, seed, out=None):
    """Every measure of one model; kept in OUT/experiment.json (OUT: the student's run directory,
    or a directory of its own for a teacher, whose weights are not ours to write beside)."""
    out_dir = out or student
    res = out_dir / "experiment.json"
    if res.is_file():
        return json.loads(res.read_text())
    r = {}
    log(f"recap eval + recap eval --dense: {tag}")
    r["eval"] = json.loads(run(f"eval-{tag}", ["eval", "--model", student, "--data", work / "heldout" / "eval.parquet", "--json"], capture=True))
    r["maskclip"] = json.loads(run(f"eval-dense-{tag}", ["eval", "--dense", "--model", student, "--data", work / "heldout" / "dense.parquet", "--json"], capture=True))
    r["finetune"] = {}
    for task, mode, frac in FINETUNES:
        k = f"{task}-{mode}-{frac:g}"
        out = out_dir / "finetune" / k
        log(f"recap finetune: {tag}, {task}, {mode}, {frac:.0%} of the labels")
        run(f"finetune-{tag}-{k}", ["finetune", "pipelines/finetune-tiny.yaml", "--no-progress", "--resume",
                                    "--set", f"student={student}", "--set", f"task={task}", "--set", f"mode={mode}",
                                    "--set", f"data.fraction={frac}", "--set", f"data.train={work / 'world' / 'dense.parquet'}",
                                    "--set", f"data.eval={work / 'heldout' / 'dense.parquet'}", "--set", f"output.dir={out}",
                                    "--set", f"train.steps={size['ft_steps']}", "--set", f"train.batch_size={size['ft_batch']}",
                                    "--set", f"train.seed={seed}", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"]
            + [x for h in HEAD for x in ("--set", h)])
        r["finetune"][k] = json.loads((out / "summary.json").read_text())
        # The numbers are kept; the weights are not needed.
        shutil.rmtree(out / "model", ignore_errors=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    metrics = student / "metrics.jsonl"
    r["curve"] = [(m["samples"], m["zero_shot"]) for m in map(json.loads, metrics.read_text().splitlines()) if "zero_shot" in m] if metrics.is_file() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(r))
    return r


# ---------------------------------------------------------------------------------------------
# Summaries


def mean_zero_shot(zs):
    """Mean top-1 over an eval set's tasks (zs: task -> top1 or task -> {top1})."""
    vals = [v["top1"] if isinstance(v, dict) else v for v in zs.values()]
    return sum(vals) / len(vals)


def metrics_of(r):
    ev = r["eval"]
    m = {
        "zero_shot_mean": mean_zero_shot(ev["zero_shot"]),
        "i2t_r1": ev["retrieval"]["image_to_text"]["r1"],
        "t2i_r1": ev["retrieval"]["text_to_image"]["r1"],
        "maskclip_miou": r["maskclip"]["zero_shot_segmentation"]["miou"],
    }
    for task, v in ev["zero_shot"].items():
        m[f"zero_shot_{task}"] = v["top1"]
    for k, s in r["finetune"].items():
        e = s["eval"]
        if e.get("segmentation"):
            m[f"miou_{k}"] = e["segmentation"]["miou"]
            m[f"pixacc_{k}"] = e["segmentation"]["pixel_accuracy"]
        if e.get("depth"):
            m[f"rmse_{k}"] = e["depth"]["rmse"]
            m[f"absrel_{k}"] = e["depth"]["abs_rel"]
            m[f"delta1_{k}"] = e["depth"]["delta1"]
    return m


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(ms, digits=3):
    m, s = ms
    if m is None:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def mean_curve(curves):
    """Seed-mean (and std) of the mean zero-shot accuracy at each evaluated sample count."""
    by = {}
    for c in curves:
        for samples, zs in c:
            by.setdefault(samples, []).append(mean_zero_shot(zs))
    return [(s, *mean_std(v)) for s, v in sorted(by.items()) if len(v) == len(curves)]


def samples_to_reach(curve, target):
    for s, m, _ in curve:
        if m >= target:
            return s
    return None


def svg_curves(series, path, title, refs=()):
    """Learning curves: series = [(label, colour, [(x, mean, std)])]; refs = [(label, y)] drawn as
    dashed horizontal lines (the teachers)."""
    W, H, L, R, T, B = 760, 430, 70, 200, 40, 55
    xs = [p[0] for _, _, c in series for p in c] or [1]
    ys = [v for _, _, c in series for p in c for v in (p[1] - p[2], p[1] + p[2])] + [y for _, y in refs] or [0, 1]
    x0, x1 = 0, max(xs)
    y0, y1 = math.floor(min(ys) * 20) / 20, math.ceil(max(ys) * 20) / 20
    if y1 <= y0:
        y1 = y0 + 0.05
    px = lambda x: L + (W - L - R) * (x - x0) / (x1 - x0 or 1)
    py = lambda y: H - B - (H - T - B) * (y - y0) / (y1 - y0)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{L}" y="22" font-size="14">{title}</text>']
    for i in range(6):
        y = y0 + (y1 - y0) * i / 5
        o.append(f'<line x1="{L}" x2="{W - R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
        o.append(f'<text x="{L - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for i in range(6):
        x = x0 + (x1 - x0) * i / 5
        o.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{T}" y2="{H - B}" stroke="#eee"/>')
        o.append(f'<text x="{px(x):.1f}" y="{H - B + 18}" text-anchor="middle">{x / 1000:.0f}k</text>')
    o.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">samples seen</text>')
    o.append(f'<text transform="translate(16,{(T + H - B) / 2}) rotate(-90)" text-anchor="middle">zero-shot top-1, mean over tasks</text>')
    o.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#888"/>')
    for label, y in refs:
        o.append(f'<line x1="{L}" x2="{W - R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#555" stroke-dasharray="6,4"/>')
        o.append(f'<text x="{W - R - 4}" y="{py(y) - 4:.1f}" text-anchor="end" fill="#555">{label}</text>')
    for i, (label, colour, c) in enumerate(series):
        if not c:
            continue
        band = [(px(x), py(m + s)) for x, m, s in c] + [(px(x), py(m - s)) for x, m, s in reversed(c)]
        o.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in band)}" fill="{colour}" fill-opacity="0.15" stroke="none"/>')
        o.append(f'<polyline points="{" ".join(f"{px(x):.1f},{py(m):.1f}" for x, m, _ in c)}" fill="none" stroke="{colour}" stroke-width="2"/>')
        ly = T + 16 + 20 * i
        o.append(f'<line x1="{W - R + 12}" x2="{W - R + 36}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/>')
        o.append(f'<text x="{W - R + 42}" y="{ly + 4}">{label}</text>')
    o.append("</svg>")
    path.write_text("\n".join(o) + "\n")


def report(work, size, arm_list, results, seeds, mode, seconds, teachers):
    per_arm = {a[0]: [metrics_of(results[(a[0], s)]) for s in seeds] for a in arm_list}
    for name, r in teachers.items():
        per_arm[name] = [metrics_of(r)]
    curves = {a[0]: mean_curve([results[(a[0], s)]["curve"] for s in seeds]) for a in arm_list}
    # (a)'s final accuracy, and when (a) itself first reached it: the other arms are compared to that.
    target = curves["a"][-1][1] if curves["a"] else None
    a_samples = samples_to_reach(curves["a"], target) if curves["a"] else None
    col = lambda k, key: mean_std([m.get(key) for m in per_arm[k]])
    tasks = sorted({k[len("zero_shot_"):] for m in per_arm["a"] for k in m if k.startswith("zero_shot_") and k != "zero_shot_mean"})
    lines = [
        f"# Curation experiment ({mode})",
        "",
        f"`python3 tools/experiment.py --{mode}`: a {size['world']}-image shapeworld → `recap run pipelines/reinforce.yaml` "
        f"({size['captions']} synthetic captions, {size['views']} augmented views per image, teachers shapeworld-clip-a and -b) → "
        f"the tiny student, {size['steps']} steps of {size['batch']} ({size['steps'] * size['batch']} samples) per arm, "
        f"seeds {', '.join(map(str, seeds))} (mean ± std) → evaluated on a held-out {size['heldout']}-image world; "
        f"dense heads (linear probe on the patch tokens) finetuned {size['ft_steps']} steps of {size['ft_batch']}. "
        f"Wall time {seconds / 60:.0f} min.",
        "",
        "## Zero-shot and retrieval (held-out world)",
        "",
        "| arm | " + " | ".join(["zero-shot mean"] + tasks + ["I→T R@1", "T→I R@1", f"samples to reach (a)'s final zero-shot"]) + " |",
        "|---|" + "---|" * (len(tasks) + 4),
    ]
    for k, name, desc, _ in arm_list:
        reach = samples_to_reach(curves[k], target) if target is not None else None
        reach_s = "not reached" if reach is None else f"{reach:,} ({a_samples / reach:.1f}× fewer)" if k != "a" else f"{reach:,}"
        lines.append(f"| ({k}) {name}: {desc} | " + " | ".join(
            [fmt(col(k, "zero_shot_mean"))] + [fmt(col(k, f"zero_shot_{t}")) for t in tasks] + [fmt(col(k, "i2t_r1")), fmt(col(k, "t2i_r1")), reach_s]) + " |")
    for name in teachers:
        lines.append(f"| teacher {name} (reference) | " + " | ".join(
            [fmt(col(name, "zero_shot_mean"))] + [fmt(col(name, f"zero_shot_{t}")) for t in tasks] + [fmt(col(name, "i2t_r1")), fmt(col(name, "t2i_r1")), "trained elsewhere"]) + " |")
    lines += [
        "",
        "## Dense (held-out world)",
        "",
        f"Segmentation mIoU (higher is better) and depth RMSE in metres (lower is better) of a linear head on the patch "
        f"tokens ({', '.join(HEAD)}; depth: scale-invariant log loss), trained on the training world's dense labels "
        f"and measured on the held-out world's; *frozen* trains the head only, *full* the encoder too; 10% = a "
        f"tenth of the dense labels. MaskCLIP = training-free segmentation from the class names' text embeddings.",
        "",
        "| arm | MaskCLIP mIoU | mIoU frozen | mIoU full | mIoU frozen 10% | mIoU full 10% | RMSE frozen | RMSE full | RMSE frozen 10% | RMSE full 10% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, name, _, _ in arm_list:
        cells = [fmt(col(k, "maskclip_miou"))]
        cells += [fmt(col(k, f"miou_segmentation-{m}-{f}")) for f in ("1", "0.1") for m in ("frozen", "full")]
        cells += [fmt(col(k, f"rmse_depth-{m}-{f}")) for f in ("1", "0.1") for m in ("frozen", "full")]
        lines.append(f"| ({k}) {name} | " + " | ".join(cells) + " |")
    for name in teachers:
        cells = [fmt(col(name, "maskclip_miou"))]
        cells += [fmt(col(name, f"miou_segmentation-{m}-{f}")) for f in ("1", "0.1") for m in ("frozen", "full")]
        cells += [fmt(col(name, f"rmse_depth-{m}-{f}")) for f in ("1", "0.1") for m in ("frozen", "full")]
        lines.append(f"| teacher {name} (reference, one finetuning seed) | " + " | ".join(cells) + " |")
    lines += ["", "![learning curves](learning_curves.svg)", ""]
    (work / "RESULTS.md").write_text("\n".join(lines))
    colours = {"a": "#1f77b4", "b": "#ff7f0e", "c": "#2ca02c", "d": "#d62728"}
    svg_curves([(f"({k}) {name}", colours.get(k, "#444"), curves[k]) for k, name, _, _ in arm_list], work / "learning_curves.svg",
               f"Zero-shot accuracy on the held-out world ({mode}; mean ± std over {len(seeds)} seeds)",
               [(f"teacher {n}", metrics_of(r)["zero_shot_mean"]) for n, r in teachers.items()])
    (work / "results.json").write_text(json.dumps({
        "size": size, "seeds": seeds, "arms": {k: {"name": n, "description": d, "settings": s} for k, n, d, s in arm_list},
        "per_seed": {k: v for k, v in per_arm.items()}, "curves": curves, "seconds": seconds,
        "teachers": list(teachers),
    }, indent=1))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the size that runs in under 15 minutes on 2 cores (default)")
    g.add_argument("--full", action="store_true", help="the README's size: a few hours on 2 cores")
    ap.add_argument("--work", type=Path, help="work directory (default runs/experiment-quick or runs/experiment-full)")
    ap.add_argument("--recap", type=Path, default=os.environ.get("RECAP_BIN"), help="the recap binary (default target/release/recap)")
    ap.add_argument("--seeds", type=int, help="seeds per arm (default 3)")
    ap.add_argument("--fresh", action="store_true", help="delete the work directory first")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report from the seeds every arm has finished (while a run is under way)")
    a = ap.parse_args()
    mode = "full" if a.full else "quick"
    size = dict(SIZES[mode])
    if a.seeds:
        if a.seeds < 1:
            raise SystemExit("--seeds must be at least 1")
        size["seeds"] = a.seeds
    work = (a.work or ROOT / "runs" / f"experiment-{mode}").resolve()
    recap = (a.recap or ROOT / "target" / "release" / "recap").resolve()
    if not recap.is_file() and not a.report_only:
        raise SystemExit(f"{recap}: no recap binary; build one with `cargo build --release --no-default-features --bin recap` or pass --recap")
    if a.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    arm_list = arms()
    seeds = list(range(size["seeds"]))
    results = {}
    if a.report_only:
        # What is finished: the seeds every arm has measured, and the teachers if they are done.
        load = lambda p: json.loads(p.read_text()) if p.is_file() else None
        for seed in seeds:
            got = {k: load(work / "students" / f"{k}-{n}" / f"seed{seed}" / "experiment.json") for k, n, _, _ in arm_list}
            if all(got.values()):
                results.update({(k, seed): r for k, r in got.items()})
        seeds = sorted({s for _, s in results})
        if not seeds:
            raise SystemExit(f"{work}: no seed has finished in every arm yet")
        teachers = {Path(t).name: load(work / "teachers" / Path(t).name / "experiment.json") for t in TEACHERS}
        teachers = {k: v for k, v in teachers.items() if v}
        text = report(work, size, arm_list, results, seeds, mode, time.time() - t0, teachers)
        print(text)
        return
    run = Runner(recap, work)
    shards = build_data(run, work, size)
    for seed in seeds:
        for arm in arm_list:
            student = train_arm(run, work, size, shards, arm, seed)
            results[(arm[0], seed)] = evaluate(run, work, size, student, f"{arm[0]}-{seed}", seed)
    # The teachers' own features, through the same measures: what the students could reach.
    teachers = {Path(t).name: evaluate(run, work, size, ROOT / t, f"teacher-{Path(t).name}", 0, out=work / "teachers" / Path(t).name) for t in TEACHERS}
    text = report(work, size, arm_list, results, seeds, mode, time.time() - t0, teachers)
    print(text)
    # Every cell must come from a run: a missing number is a failure, not a dash.
    missing = [f"arm {k} seed {s}: {m}" for (k, s), r in results.items() for m in
               [f"finetune {f}" for f, v in r["finetune"].items() if not (v.get("eval") or {}).get("segmentation" if f.startswith("seg") else "depth")]
               + (["learning curve"] if len(r["curve"]) < 2 else [])]
    missing += [f"teacher {t}: finetune {f}" for t, r in teachers.items() for f, v in r["finetune"].items()
                if not (v.get("eval") or {}).get("segmentation" if f.startswith("seg") else "depth")]
    if missing or "–" in text:
        raise SystemExit("the experiment is incomplete: " + "; ".join(missing or ["a table cell has no value"]))
    log(f"wrote {work / 'RESULTS.md'}, {work / 'results.json'}, {work / 'learning_curves.svg'}")


if __name__ == "__main__":
    main()
