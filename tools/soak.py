"""Soak tests for recap run (issue 14), as a user's machine sees them; prints figures.

kill   : RUNS runs of one pipeline (600 rows, 30 shards, served shapeworld with latency) killed
         with SIGKILL at random moments (uniform over a run's length) and resumed; after every kill
         every visible shard file reads back whole and every marked shard has its marker's rows;
         after the last, a run to completion gives every input row exactly once.
         --store s3: the shards go to a bucket on a moto S3 server started here, every Parquet
         file a multipart upload; after the last run no multipart upload is left open and no
         `.upload` record is left. --store az: the same in a container on Azurite
         (tests/azurite, scripts/azurite-env.sh), every Parquet file a block upload; after the
         last run no blob holds uncommitted blocks.
slow   : CONNS concurrent connections to a loopback server that trickles one byte a second and
         never finishes, mixed with NORMAL rows from a served shapeworld; recap (concurrency
         CONNS + NORMAL) must keep progressing: every normal image is served (timed by the test's
         own server) before the slow ones time out, while they are open; the slow ones end as
         `timeout`; peak RSS sampled throughout; no row lost.

Usage: .venv/bin/python tools/soak.py kill [--runs 100] [--store local|s3|az]
       .venv/bin/python tools/soak.py slow [--conns 10000]
       (--recap target/release/recap by default; --work target/soak)
"""
import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def serve_world(recap, world, port, latency="0ms"):
    p = subprocess.Popen([recap, "synth", "serve", str(world), "--port", str(port), "--latency", latency],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p.stdout.readline()  # "serving ..."
    return p


class LocalShards:
    """The run's output directory."""

    def __init__(self, path):
        self.path = path
        self.url = str(path)
        self.yaml = ""

    def names(self):
        return sorted(p.name for p in self.path.glob("*")) if self.path.exists() else []

    def read(self, name):
        return (self.path / name).read_bytes()

    def clear(self):
        subprocess.run(["rm", "-rf", str(self.path)], check=True)

    def left_open(self):
        return []


def once_up(call, server):
    """Make `call` (a bucket, a container) as soon as the server just started answers: 10 s."""
    for _ in range(100):
        try:
            return call()
        except Exception:  # noqa: BLE001 (not listening yet)
            time.sleep(0.1)
    raise SystemExit(f"{server} did not start")


class S3Shards:
    """A bucket on a moto S3 server this soak starts: shards under s3://soak/shards, every Parquet
    file a multipart upload (threshold 1KB)."""

    def __init__(self, port):
        import boto3
        moto = Path(sys.executable).with_name("moto_server")
        self.server = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id="soak", aws_secret_access_key="secret")
        once_up(lambda: self.s3.create_bucket(Bucket="soak"), "moto_server")
        self.url = "s3://soak/shards"
        self.yaml = f"""storage:
  multipart_threshold: 1KB
  options:
    aws_endpoint: {endpoint}
    aws_allow_http: "true"
    aws_region: us-east-1
    aws_access_key_id: soak
    aws_secret_access_key: secret
"""

    def names(self):
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket="soak", Prefix="shards/"):
            out += [o["Key"].removeprefix("shards/") for o in page.get("Contents", [])]
        return sorted(out)

    def read(self, name):
        return self.s3.get_object(Bucket="soak", Key=f"shards/{name}")["Body"].read()

    def clear(self):
        for name in self.names():
            self.s3.delete_object(Bucket="soak", Key=f"shards/{name}")

    def left_open(self):
        """Multipart uploads open under the prefix, and `.upload` records."""
        open_ = self.s3.list_multipart_uploads(Bucket="soak", Prefix="shards/").get("Uploads", [])
        return [u["Key"] for u in open_] + [n for n in self.names() if n.endswith(".upload")]


class AzureShards:
    """A container on Azurite (the Azure Blob emulator, npm, in tests/azurite) this soak starts:
    shards under az://soak/shards, every Parquet file a block upload (threshold 1KB)."""

    ACCOUNT = "devstoreaccount1"
    KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

    def __init__(self, port, work):
        from azure.storage.blob import BlobServiceClient
        azurite = Path(__file__).resolve().parent.parent / "tests/azurite/node_modules/.bin/azurite-blob"
        if not azurite.is_file():
            raise SystemExit(f"{azurite} is missing: run scripts/azurite-env.sh")
        (work / "azurite").mkdir()
        self.server = subprocess.Popen([str(azurite), "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck",
                                        "--blobHost", "127.0.0.1", "--blobPort", str(port)],
                                       cwd=work / "azurite", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}/{self.ACCOUNT}"
        conn = f"DefaultEndpointsProtocol=http;AccountName={self.ACCOUNT};AccountKey={self.KEY};BlobEndpoint={endpoint};"
        self.c = BlobServiceClient.from_connection_string(conn).get_container_client("soak")
        once_up(self.c.create_container, "Azurite")
        self.url = "az://soak/shards"
        self.yaml = f"""storage:
  multipart_threshold: 1KB
  options:
    azure_storage_account_name: {self.ACCOUNT}
    azure_storage_account_key: "{self.KEY}"
    azure_storage_endpoint: {endpoint}
    azure_allow_http: "true"
"""

    def names(self):
        return sorted(b.name.removeprefix("shards/") for b in self.c.list_blobs(name_starts_with="shards/"))

    def read(self, name):
        return self.c.download_blob(f"shards/{name}").readall()

    def clear(self):
        for name in self.names():
            self.c.delete_blob(f"shards/{name}")

    def left_open(self):
        """Blobs holding uncommitted blocks (a cut block upload), and `.upload` records."""
        cut = [b.name for b in self.c.list_blobs(name_starts_with="shards/", include=["uncommittedblobs"])
               if self.c.get_blob_client(b.name).get_block_list("uncommitted")[1]]
        return cut + [n for n in self.names() if n.endswith(".upload")]


def shard_rows(out):
    """(committed shard -> ids) and a list of problems with visible files."""
    import io
    problems, committed = [], {}
    names = out.names()
    for name in (n for n in names if n.endswith(".parquet")):
        try:
            t = pq.read_table(io.BytesIO(out.read(name)), columns=["id"])
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: unreadable: {e}")
            continue
        done = name[: -len(".parquet")] + ".done"
        if done in names:
            marker = json.loads(out.read(done))
            if marker["rows"] != t.num_rows:
                problems.append(f"{name}: marker says {marker['rows']} rows, file has {t.num_rows}")
            committed[name] = t.column("id").to_pylist()
    return committed, problems


def kill(args):
    work = Path(args.work) / "kill"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    subprocess.run([args.recap, "synth", "--out", str(work / "world"), "--count", "600", "--seed", "9",
                    "--min-size", "64x48", "--max-size", "200x150"], check=True, stdout=subprocess.DEVNULL)
    server = serve_world(args.recap, work / "world", args.port, "20ms")
    if args.store == "s3":
        out = S3Shards(args.port + 2)
    elif args.store == "az":
        out = AzureShards(args.port + 2, work)
    else:
        out = LocalShards(work / "shards")
    (work / "p.yaml").write_text(f"""input:
  path: {work}/world/urls.parquet
  passthrough: [id]
  rows_per_shard: 20
download:
  concurrency: 16
  rate_per_host: null
  allow_private_networks: true
image:
  size: 64
  min_size: 1
engine:
  shards_in_flight: 3
output:
  path: {out.url}
{out.yaml}""")
    cmd = [args.recap, "run", str(work / "p.yaml"), "--no-progress"]
    # One uninterrupted run's length, to spread the kills over it.
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    full = time.monotonic() - t
    out.clear()
    rng = random.Random(args.seed)
    killed_running, finished, problems = 0, 0, []
    start = time.monotonic()
    for i in range(args.runs):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, full * 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed_running += 1
        else:
            finished += 1
        p.wait()
        committed, probs = shard_rows(out)
        problems += [f"after kill {i}: {x}" for x in probs]
        if finished and len(committed) == 30:
            # Everything committed: start over so every kill lands on work.
            out.clear()
    left_before = len(out.left_open())
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    committed, probs = shard_rows(out)
    problems += probs
    left = out.left_open()
    problems += [f"left open after the last run: {x}" for x in left]
    ids = sorted(i for v in committed.values() for i in v)
    server.terminate()
    if args.store != "local":
        out.server.terminate()
    ok = ids == list(range(600)) and len(committed) == 30 and not problems
    print(json.dumps({"test": "kill", "store": args.store, "runs": args.runs, "killed_while_running": killed_running,
                      "finished_before_kill": finished, "uninterrupted_run_s": round(full, 2),
                      "shards": len(committed), "rows": len(ids), "distinct_rows": len(set(ids)),
                      "uploads_left_open_before_the_last_run": left_before,
                      "problems": problems[:10], "seconds": round(time.monotonic() - start, 1), "ok": ok}))
    return ok


async def trickle_server(port, stats, images):
    async def handle(reader, writer):
        stats["open"] += 1
        stats["peak"] = max(stats["peak"], stats["open"])
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
            while True:
                writer.write(b"\xff")
                await writer.drain()
                await asyncio.sleep(1.0)
        except Exception:  # noqa: BLE001
            pass
        finally:
            stats["open"] -= 1
            writer.close()
    async def handle_image(reader, writer):
        # The normal rows' images, served here (not by `recap synth serve`) so that each one's
        # completion time is known: progress while the slow connections hang is measured.
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            body = (images / path.removeprefix("/img/")).read_bytes()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            stats["served"].append((time.monotonic(), stats["open"]))
        except Exception:  # noqa: BLE001
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096, limit=1 << 16)
    normal = await asyncio.start_server(handle_image, "127.0.0.1", port + 1, backlog=4096)
    async with server, normal:
        await asyncio.gather(server.serve_forever(), normal.serve_forever())


def slow(args):
    import pyarrow as pa
    work = Path(args.work) / "slow"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    stats = {"open": 0, "peak": 0, "served": []}
    subprocess.run([args.recap, "synth", "--out", str(work / "world"), "--count", "200", "--seed", "4",
                    "--min-size", "64x48", "--max-size", "160x120", "--png-fraction", "0"], check=True, stdout=subprocess.DEVNULL)
    loop = asyncio.new_event_loop()
    threading.Thread(target=lambda: loop.run_until_complete(trickle_server(args.port, stats, work / "world" / "images")),
                     daemon=True).start()
    time.sleep(0.5)
    files = [u.split("/img/", 1)[1] for u in pq.read_table(work / "world" / "urls.parquet", columns=["url"]).column("url").to_pylist()]
    normal = [f"http://127.0.0.1:{args.port + 1}/img/{f}" for f in files]
    slow_urls = [f"http://127.0.0.1:{args.port}/slow/{i}.jpg" for i in range(args.conns)]
    normal_urls = [normal[i % len(normal)] for i in range(args.normal)]
    # Interleaved: every shard holds slow and normal rows.
    urls, kinds = [], []
    step = max(args.conns // max(args.normal, 1), 1)
    ni = 0
    for i, u in enumerate(slow_urls):
        urls.append(u)
        kinds.append("slow")
        if i % step == 0 and ni < len(normal_urls):
            urls.append(normal_urls[ni])
            kinds.append("normal")
            ni += 1
    urls += normal_urls[ni:]
    kinds += ["normal"] * (len(normal_urls) - ni)
    n = len(urls)
    pq.write_table(pa.table({"url": urls, "caption": kinds, "id": list(range(n))}), work / "urls.parquet")
    (work / "p.yaml").write_text(f"""input:
  path: {work}/urls.parquet
  passthrough: [id]
  rows_per_shard: {max(n // 10, 1)}
download:
  concurrency: {n}
  per_host: {n}
  rate_per_host: null
  adaptive_concurrency: false
  timeout: {args.timeout}s
  retries: 0
  allow_private_networks: true
image:
  size: 64
  min_size: 1
engine:
  shards_in_flight: 10
output:
  path: {work}/shards
""")
    start = time.monotonic()
    p = subprocess.Popen([args.recap, "run", str(work / "p.yaml"), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_rss, peak_conns, samples = 0.0, 0, []
    while p.poll() is None:
        r = rss_mb(p.pid)
        peak_rss = max(peak_rss, r)
        peak_conns = max(peak_conns, stats["open"])
        samples.append((round(time.monotonic() - start, 1), round(r, 1), stats["open"], len(stats["served"])))
        time.sleep(0.5)
    out = p.stdout.read()
    committed, probs = shard_rows(work / "shards")
    rows = sum(len(v) for v in committed.values())
    statuses = {}
    for f in (work / "shards").glob("*.stats.json"):
        for k, v in json.loads(f.read_text())["status"].items():
            statuses[k] = statuses.get(k, 0) + v
    served = stats["served"]
    # Progress while the slow connections hang: every normal image was served before the slow
    # ones timed out, most of them while (nearly) all slow connections were open.
    last_normal_s = round(max(t for t, _ in served) - start, 1) if served else None
    open_at_normal = sorted(o for _, o in served)
    open_median = open_at_normal[len(open_at_normal) // 2] if served else 0
    ok = (p.returncode == 0 and rows == n and not probs and statuses.get("ok", 0) == args.normal
          and statuses.get("timeout", 0) == args.conns and len(served) == args.normal
          and all(t - start < args.timeout for t, _ in served))
    print(json.dumps({"test": "slow", "slow_connections": args.conns, "normal_rows": args.normal, "peak_open_connections": peak_conns, "peak_rss_mb": round(peak_rss, 1),
                      "seconds": round(time.monotonic() - start, 1), "rows": rows, "statuses": statuses,
                      "rss_mb_every_5s": [s[1] for s in samples[::10]], "open_slow_every_5s": [s[2] for s in samples[::10]],
                      "normal_served_every_5s": [s[3] for s in samples[::10]], "all_normal_served_at_s": last_normal_s,
                      "median_slow_open_while_serving_normal": open_median,
                      "ok": ok, "tail": out[-300:] if not ok else ""}))
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("test", choices=["kill", "slow"])
    ap.add_argument("--recap", default="target/release/recap")
    ap.add_argument("--work", default="target/soak")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--normal", type=int, default=2000)
    ap.add_argument("--timeout", type=int, default=20)
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--store", choices=["local", "s3", "az"], default="local")
    args = ap.parse_args()
    ok = kill(args) if args.test == "kill" else slow(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
