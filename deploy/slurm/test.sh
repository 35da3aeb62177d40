#!/usr/bin/env bash
# recap under a real Slurm scheduler (.ci/run runs this): a one-node cluster (one-node-cluster.sh),
# a served shapeworld, and `sbatch --array=0-3 recap-array.sbatch` over 24 shards. Task 1 is
# requeued (killed and started again by Slurm) after it has committed a shard. Checks: every
# shard has its marker and is committed exactly once across all task logs, every input row comes
# out once, and the requeued task skipped what it had already done. When the daemons cannot start
# here, it says so and exits 0 (the rest of CI still runs).
# Usage: bash deploy/slurm/test.sh   (RECAP=path/to/recap, default target/debug/recap)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
RECAP=${RECAP:-$root/target/debug/recap}
PY=${RECAP_PYTHON:-$root/.venv/bin/python}
work=${WORK:-/tmp/recap-slurm-test}
rm -rf "$work"
mkdir -p "$work"
export STATE="$work/cluster"
if ! out=$(bash deploy/slurm/one-node-cluster.sh up 2>"$work/cluster.err"); then
  echo "SLURM TEST NOT RUN: a one-node Slurm cluster could not be started on this machine:"
  sed 's/^/  /' "$work/cluster.err" | tail -8
  exit 0
fi
eval "$out"
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  bash "$root/deploy/slurm/one-node-cluster.sh" down || true
}
trap cleanup EXIT
echo "slurm: $(sinfo -h -o '%P %D nodes %c cpus %t') (SLURM_CONF=$SLURM_CONF)"

"$RECAP" synth --out "$work/world" --count 240 --seed 3 --min-size 64x48 --max-size 160x120 --png-fraction 0 > /dev/null
port=$((20000 + RANDOM % 20000))
"$RECAP" synth serve "$work/world" --port "$port" --latency 150ms > "$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 100); do grep -q serving "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
cat > "$work/pipeline.yaml" <<YAML
input:
  path: $work/world/urls.parquet
  passthrough: [id]
  rows_per_shard: 10
download:
  concurrency: 2
  rate_per_host: null
  allow_private_networks: true
image:
  size: 64
  min_size: 1
output:
  path: $work/shards
YAML

job=$(sbatch --parsable --array=0-3 --chdir="$work" --export="ALL,RECAP=$RECAP,RECAP_LOG=recap=info" \
  deploy/slurm/recap-array.sbatch "$work/pipeline.yaml")
echo "submitted array job $job (4 tasks, 24 shards, task i runs shards s % 4 == i)"
log1="$work/recap-${job}_1.log"
for _ in $(seq 600); do grep -q "shard committed" "$log1" 2>/dev/null && break; sleep 0.1; done
grep -q "shard committed" "$log1" || { echo "task 1 never committed a shard"; cat "$work"/recap-*.log; exit 1; }
scontrol requeue "${job}_1"
echo "requeued task 1 after: $(grep -c 'shard committed' "$log1") shard(s) committed"
# Slurm holds a requeued job back by the credential lifetime (AuthInfo cred_expire, 120 s by
# default) so that its new launch credential is newer than the one slurmd revoked when it killed
# the task. slurmd compares the two in whole seconds: a relaunch in the same second as the revoke
# is refused ("credential revoked") and the task ends FAILED. So wait until the killed run has
# exited, then let the task start again 3 s later rather than at once.
for _ in $(seq 200); do
  squeue -h -j "${job}_1" -o %T 2>/dev/null | grep -q PENDING && grep -q "interrupted by SIGTERM" "$log1" && break
  sleep 0.1
done
scontrol update JobId="${job}_1" StartTime=now+3 || true
for _ in $(seq 600); do
  [ -z "$(squeue -h -j "$job" 2>/dev/null)" ] && break
  sleep 0.5
done
diagnose() {
  for f in "$work"/recap-"$job"_*.log; do echo "--- $f"; grep -v DEBUG "$f" | cut -c1-300 | tail -25; done
  echo "--- scontrol show job $job"; scontrol show job "$job" 2>/dev/null | grep -E 'JobId|JobState|Reason|ExitCode|Restarts' || true
  echo "--- slurmd.log"; grep -v 'pmix\|MPI' "$STATE/slurmd.log" | tail -25
  echo "--- slurmctld.log"; grep -i 'requeue\|fail\|error\|revoke\|begin' "$STATE/slurmctld.log" | tail -25
}
if [ -n "$(squeue -h -j "$job")" ]; then echo "the array did not finish:"; squeue -j "$job"; diagnose; exit 1; fi
sacct_state=$(scontrol show job "$job" 2>/dev/null | grep -o 'JobState=[A-Z]*' | sort | uniq -c | tr '\n' ' ' || true)
echo "array finished: $sacct_state"

if ! "$PY" - "$work" "$job" <<'PY'
import collections, glob, json, os, re, sys
import pyarrow.parquet as pq
work, job = sys.argv[1], sys.argv[2]
shards = sorted(glob.glob(f"{work}/shards/*.parquet"))
assert len(shards) == 24, f"{len(shards)} shard files, expected 24"
for s in shards:
    assert os.path.exists(s[: -len(".parquet")] + ".done"), f"{s} has no completion marker"
ids = [i for s in shards for i in pq.read_table(s, columns=["id"]).column("id").to_pylist()]
assert len(ids) == 240 and len(set(ids)) == 240, f"{len(ids)} rows, {len(set(ids))} distinct; expected 240 once each"
commits = collections.Counter()
for log in glob.glob(f"{work}/recap-{job}_*.log"):
    for m in re.finditer(r"shard committed shard=(\d+)", open(log).read()):
        commits[int(m.group(1))] += 1
assert sorted(commits) == list(range(24)), f"committed shards: {sorted(commits)}"
twice = {s: n for s, n in commits.items() if n != 1}
assert not twice, f"shards committed more than once: {twice}"
log1 = open(f"{work}/recap-{job}_1.log").read()
starts = re.findall(r"task 1/4 \(restart (\d+)\)", log1)
assert starts[-1] != "0", f"task 1 was not restarted by the requeue: {starts}"
skipped = re.findall(r"(\d+) already complete \(skipped\)", log1)
assert skipped and int(skipped[-1]) >= 1, f"the requeued task skipped nothing: {skipped}"
print(f"ok: 24 shards, each committed once; 240 rows once each; task 1 started {len(starts)} times "
      f"and skipped {skipped[-1]} shard(s) it had committed before the requeue")
PY
then
  diagnose
  exit 1
fi
