"""Run a command; print its wall time and the peak of the summed RSS of its whole process tree.

Usage: peak_rss.py LABEL -- CMD [ARGS...]   (prints one JSON line on stderr's last line)
Sampling /proc every 50 ms: a tree of worker processes (img2dataset's) is counted in full,
which /usr/bin/time's max RSS (largest single process) would not do.
"""
import json
import os
import subprocess
import sys
import time

label = sys.argv[1]
cmd = sys.argv[sys.argv.index("--") + 1:]


def tree_rss(root):
    children = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(parts[1]), []).append(int(pid))
        except OSError:
            pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


start = time.monotonic()
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
peak = 0
while proc.poll() is None:
    peak = max(peak, tree_rss(proc.pid))
    time.sleep(0.05)
wall = time.monotonic() - start
print(json.dumps({"label": label, "rc": proc.returncode, "wall_s": round(wall, 2), "peak_rss_mb": round(peak / 1e6, 1)}))
