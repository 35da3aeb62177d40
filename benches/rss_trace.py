"""Where a run's memory goes over time: sample RssAnon every 2 ms, time-stamp the "shard committed"
log lines, and print the anonymous memory around the commits and the largest samples.

Usage: RECAP_LOG=info python3 benches/rss_trace.py recap run PIPELINE.yaml --no-progress
(how the shard-write spikes in benches/results/2026-12-0[67]-memory-*.txt were found and measured)
"""
import statistics
import subprocess
import sys
import threading
import time

p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
t0 = time.time()
rows, commits = [], []


def read_log():
    for line in p.stderr:
        if "shard committed" in line:
            commits.append(time.time() - t0)


threading.Thread(target=read_log, daemon=True).start()
while p.poll() is None:
    try:
        d = {}
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "VmHWM"):
                    d[k] = int(v.split()[0]) / 1024
        rows.append((time.time() - t0, d["RssAnon"], d["VmHWM"]))
    except (OSError, KeyError):
        pass
    time.sleep(0.002)
time.sleep(0.2)
if not rows:
    sys.exit("no samples")
anon = [r[1] for r in rows]
print(f"samples {len(rows)} commits {len(commits)} anon median {statistics.median(anon):.1f} max {max(anon):.1f} MiB, hwm {rows[-1][2]:.1f}")
T, W = rows[-1][0], 12
for i in range(W):
    w = sorted(r[1] for r in rows if i * T / W <= r[0] < (i + 1) * T / W)
    if w:
        print(f"  {i * T / W:7.2f}-{(i + 1) * T / W:7.2f} s  anon median {w[len(w) // 2]:.1f} max {w[-1]:.1f}")
if commits:
    gaps = [b - a for a, b in zip(commits, commits[1:])]
    peaks = sorted(((max((r[1] for r in rows if c - 0.06 <= r[0] <= c + 0.01), default=0), c) for c in commits), reverse=True)
    print(f"the 60 ms before each commit: peak median {statistics.median(x for x, _ in peaks):.1f}, max {peaks[0][0]:.1f}; smallest gap between commits {min(gaps, default=0) * 1000:.0f} ms")
    for peak, c in peaks[:2] + peaks[len(peaks) // 2:len(peaks) // 2 + 1]:
        around = " ".join(f"{(r[0] - c) * 1000:+.0f}:{r[1]:.1f}" for r in rows if c - 0.07 <= r[0] <= c + 0.015)
        print(f"  commit at {c:.2f} s (peak {peak:.1f}): {around}")
