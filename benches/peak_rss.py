"""Run a command; print its wall time and the peak of the summed RSS of its whole process tree.

Usage: peak_rss.py LABEL -- CMD [ARGS...]   (prints one JSON line on stderr's last line)
Sampling /proc every 50 ms: a tree of worker processes (img2dataset's) is counted in full,
which /usr/bin/time's max RSS (largest single process) would not do. Sampling misses spikes
shorter than its period (a 0.3 s run gets six samples), so the peak is also the kernel's own
high-water mark of the command's process (wait4's ru_maxrss, exact for a one-process tool such
as recap): the larger of the two is printed, and both are in the JSON.
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
rc = None
while rc is None:
    peak = max(peak, tree_rss(proc.pid))
    # WNOHANG: (0, 0, None) while it runs; the root's rusage when it has exited.
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
        rc = os.waitstatus_to_exitcode(status)
        hwm = usage.ru_maxrss * 1024  # Linux: kilobytes
    else:
        time.sleep(0.05)
wall = time.monotonic() - start
print(json.dumps({"label": label, "rc": rc, "wall_s": round(wall, 2), "peak_rss_mb": round(max(peak, hwm) / 1e6, 1),
                  "sampled_tree_mb": round(peak / 1e6, 1), "root_hwm_mb": round(hwm / 1e6, 1)}))
