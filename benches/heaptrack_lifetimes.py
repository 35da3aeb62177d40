"""Which allocations of a size range live long: read a heaptrack recording and print, per call
site and size, how many blocks it made, the longest and mean time one lived (frees matched to
allocations first in, first out per site, which heaptrack's own report does not give).

Usage: heaptrack -o /tmp/ht recap run PIPELINE.yaml --no-progress   (a scratch release build
with the `#[global_allocator]` lines of src/main.rs removed, so that heaptrack sees every
allocation through malloc), then
       python3 benches/heaptrack_lifetimes.py /tmp/ht.zst MIN_BYTES MAX_BYTES [TOP]

How the long-lived large blocks behind the 3k -> 1M memory growth were found
(benches/results/2026-12-07-memory-pinned-pages.txt): mimalloc 3 puts blocks of 84-512 KiB in
4 MiB pages, so one long-lived block there keeps the page's touched memory resident.
Times are heaptrack's clock: a run under heaptrack is ~3x slower than without.
"""
import collections
import subprocess
import sys

path, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
top = int(sys.argv[4]) if len(sys.argv) > 4 else 25
p = subprocess.Popen(["zstd", "-dc", path], stdout=subprocess.PIPE, text=True, bufsize=1 << 20)
strings, ips, traces, infos = [None], [None], [(0, 0)], []
now = 0
live = collections.defaultdict(collections.deque)  # alloc-info index -> allocation times
stat = {}  # alloc-info index -> [blocks, longest life, total life]


def lived(i, since):
    s = stat.setdefault(i, [0, 0, 0])
    s[0] += 1
    s[1] = max(s[1], now - since)
    s[2] += now - since


# heaptrack's interpreted format: 'a SIZE TRACE' defines an allocation info, '+ INFO' / '- INFO'
# allocate / free one block of it, 'c MS' is the clock, 's' strings, 'i' instruction pointers
# (ip, module, then function/file/line string indexes per inlined frame), 't IP PARENT' traces.
for line in p.stdout:
    c = line[0]
    if c == "+":
        i = int(line[2:], 16)
        if lo <= infos[i][0] < hi:
            live[i].append(now)
    elif c == "-":
        i = int(line[2:], 16)
        if lo <= infos[i][0] < hi and live[i]:
            lived(i, live[i].popleft())
    elif c == "a":
        a = line.split()
        infos.append((int(a[1], 16), int(a[2], 16)))
    elif c == "c":
        now = int(line[2:], 16)
    elif c == "s":
        rest = line[2:].rstrip("\n")
        strings.append(rest.split(" ", 1)[1] if " " in rest else rest)
    elif c == "i":
        ips.append([int(x, 16) for x in line.split()[2:]])
    elif c == "t":
        a = line.split()
        traces.append((int(a[1], 16), int(a[2], 16)))
for i, q in live.items():  # still live at the end
    for since in q:
        lived(i, since)

SKIP = ("alloc", "grow", "realloc", "reserve", "finish_grow", "do_reserve", "__rust", "_R", "RawVec", "raw_vec")


def frames(trace):
    out = []
    while trace and len(out) < 14:
        ip, parent = traces[trace]
        d = ips[ip]
        for k in range(1, len(d), 3):
            if 0 < d[k] < len(strings):  # 0: no function name recorded
                out.append(strings[d[k]][:60])
        trace = parent
    return " < ".join(f for f in out if not f.startswith(SKIP))[:700]


print(f"run lasted {now} ms (heaptrack's clock)")
for i, (n, longest, total) in sorted(stat.items(), key=lambda kv: -kv[1][1])[:top]:
    size, trace = infos[i]
    print(f"size {size} blocks {n} longest {longest} ms mean {total / n:.0f} ms :: {frames(trace)}")
