//! Which shards this process runs: `--worker I/N`, or the index a scheduler gives an array job
//! (Slurm's `SLURM_ARRAY_TASK_ID`/`SLURM_ARRAY_TASK_COUNT`, a Kubernetes Indexed Job's
//! `JOB_COMPLETION_INDEX` with `RECAP_WORKER_COUNT`). Shard s is run by worker `s % N`, so N
//! independent processes cover every shard exactly once with no coordinator.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker {
    pub index: u64,
    pub count: u64,
}

impl Default for Worker {
    fn default() -> Self {
        Worker { index: 0, count: 1 }
    }
}

impl std::fmt::Display for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Worker {
    pub fn owns(&self, shard: u64) -> bool {
        shard % self.count == self.index
    }

    pub fn parse(s: &str) -> Result<Worker> {
        let bad = || Error::Usage(format!("--worker {s:?}: expected I/N with 0 <= I < N, e.g. --worker 0/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u64 = i.trim().parse().map_err(|_| bad())?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Worker { index, count })
    }

    /// From the command line when given, else from a scheduler's environment, else 0/1.
    pub fn resolve(cli: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<Worker> {
        if let Some(s) = cli {
            return Worker::parse(s);
        }
        let num = |name: &str| -> Result<Option<u64>> {
            match env(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| Error::Usage(format!("{name}={v:?} is not a number"))),
            }
        };
        if let (Some(id), Some(count)) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).ok_or_else(|| Error::Usage(format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")))?;
            if count == 0 || index >= count {
                return Err(Error::Usage(format!(
                    "Slurm array task {id} (min {min}) is outside {count} tasks; use a contiguous --array such as 0-{}",
                    count.saturating_sub(1)
                )));
            }
            return Ok(Worker { index, count });
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = num("RECAP_WORKER_COUNT")?.ok_or_else(|| {
                Error::Usage("JOB_COMPLETION_INDEX is set but RECAP_WORKER_COUNT is not: set it to the Job's completions".into())
            })?;
            if count == 0 || index >= count {
                return Err(Error::Usage(format!("JOB_COMPLETION_INDEX {index} is outside RECAP_WORKER_COUNT {count}")));
            }
            return Ok(Worker { index, count });
        }
        Ok(Worker::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn sources_of_the_worker_index() {
        assert_eq!(Worker::resolve(Some("2/5"), &env(&[])).unwrap(), Worker { index: 2, count: 5 });
        assert!(Worker::resolve(Some("5/5"), &env(&[])).is_err());
        let slurm = [("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_ARRAY_TASK_MIN", "1")];
        assert_eq!(Worker::resolve(None, &env(&slurm)).unwrap(), Worker { index: 2, count: 4 });
        let k8s = [("JOB_COMPLETION_INDEX", "1"), ("RECAP_WORKER_COUNT", "3")];
        assert_eq!(Worker::resolve(None, &env(&k8s)).unwrap(), Worker { index: 1, count: 3 });
        assert!(Worker::resolve(None, &env(&[("JOB_COMPLETION_INDEX", "1")])).is_err());
        assert_eq!(Worker::resolve(None, &env(&[])).unwrap(), Worker::default());
    }
}
