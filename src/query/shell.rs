//! `recap query` with no SQL: an interactive shell on a terminal (line editing, history in
//! `~/.recap_history`, statements spanning lines until `;`), or statements read from stdin.

use std::io::{IsTerminal, Read};
use std::path::Path;

use datafusion::prelude::SessionContext;

use super::{execute, write_result, Format, ShardInfo};
use crate::error::{Error, Result};

const HELP: &str = "\
statements end with ';' and may span lines. Tables: shards (one row per input row), stats (one row per shard).
  \\d          list the tables
  \\d TABLE    the columns of TABLE and their types
  \\df         the embedding functions
  \\timing     show each statement's time and the bytes its scans read
  \\q          quit (also Ctrl-D)";

/// Split a script into statements at `;` outside quotes and `--` comments.
pub fn split_statements(script: &str) -> Vec<String> {
    let (mut out, rest) = split_complete(script);
    if !rest.trim().is_empty() {
        out.push(rest.trim().to_string());
    }
    out
}

/// The statements a script completes (each ended by `;` outside quotes and comments) and the
/// unfinished rest, comments dropped, to which more text can be appended and split again.
fn split_complete(script: &str) -> (Vec<String>, String) {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = script.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                cur.push(c);
                if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    cur.push(c);
                }
                '-' if chars.peek() == Some(&'-') => {
                    for c in chars.by_ref() {
                        if c == '\n' {
                            cur.push('\n');
                            break;
                        }
                    }
                }
                ';' => {
                    if !cur.trim().is_empty() {
                        out.push(cur.trim().to_string());
                    }
                    cur.clear();
                }
                c => cur.push(c),
            },
        }
    }
    (out, cur)
}

/// Answer a backslash command; `Ok(false)` means quit.
async fn meta(ctx: &SessionContext, info: &ShardInfo, line: &str, timing: &mut bool) -> Result<bool> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("\\q"), _) => return Ok(false),
        (Some("\\?" | "\\h" | "\\help"), _) => println!("{HELP}"),
        (Some("\\timing"), _) => {
            *timing = !*timing;
            println!("timing is {}", if *timing { "on" } else { "off" });
        }
        (Some("\\df"), _) => {
            for (sig, what) in super::udf::FUNCTIONS {
                println!("  {sig:<40} {what}");
            }
        }
        (Some("\\d"), None) => {
            println!("  shards  {} file{} ({} columns)", info.files.len(), if info.files.len() == 1 { "" } else { "s" }, info.schema.fields().len());
            println!("  stats   one row per shard, from the NNNNN.stats.json files");
        }
        (Some("\\d"), Some(table)) => match ctx.table(table).await {
            Ok(t) => {
                for f in t.schema().fields() {
                    println!("  {:<24} {}", f.name(), f.data_type());
                }
            }
            Err(_) => println!("no table {table:?}; the tables are shards and stats"),
        },
        (Some(other), _) => println!("unknown command {other}; \\? lists the commands"),
        (None, _) => {}
    }
    Ok(true)
}

async fn run_one(ctx: &SessionContext, sql: &str, format: Format, timing: bool) {
    let t = std::time::Instant::now();
    match execute(ctx, sql).await {
        Ok(r) => {
            if let Err(e) = write_result(&r, format, None) {
                eprintln!("error: {e}");
            }
            if timing {
                println!("{:.3}s, {:.1} MB read from the shards", t.elapsed().as_secs_f64(), r.bytes_scanned as f64 / 1e6);
            }
        }
        Err(e) => eprintln!("error: {e}"),
    }
}

/// Run a script: its statements in order, stopping at the first error, and the backslash
/// commands the shell knows on lines of their own between statements (as psql and duckdb take
/// them from a file or a pipe).
pub async fn run_script(ctx: &SessionContext, info: &ShardInfo, script: &str, format: Format) -> Result<()> {
    let mut pending = String::new();
    let mut timing = false;
    for line in script.lines() {
        if pending.trim().is_empty() && line.trim_start().starts_with('\\') {
            if !meta(ctx, info, line.trim(), &mut timing).await? {
                return Ok(());
            }
            pending.clear();
            continue;
        }
        pending.push_str(line);
        pending.push('\n');
        let (done, rest) = split_complete(&pending);
        for sql in done {
            script_statement(ctx, &sql, format, timing).await?;
        }
        pending = rest;
    }
    if !pending.trim().is_empty() {
        script_statement(ctx, pending.trim(), format, timing).await?;
    }
    Ok(())
}

async fn script_statement(ctx: &SessionContext, sql: &str, format: Format, timing: bool) -> Result<()> {
    let t = std::time::Instant::now();
    let r = execute(ctx, sql).await?;
    write_result(&r, format, None)?;
    if timing {
        eprintln!("{:.3}s, {:.1} MB read from the shards", t.elapsed().as_secs_f64(), r.bytes_scanned as f64 / 1e6);
    }
    Ok(())
}

/// The shell. On a terminal it reads lines with history; otherwise it runs the script on stdin
/// ([`run_script`]) and stops at the first error (exit status 1).
pub async fn run(ctx: &SessionContext, info: &ShardInfo, spec: &Path, format: Format) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        let mut script = String::new();
        std::io::stdin().read_to_string(&mut script).map_err(|e| Error::io("cannot read", "stdin", e))?;
        return run_script(ctx, info, &script, format).await;
    }
    use rustyline::error::ReadlineError;
    let mut rl = rustyline::DefaultEditor::new().map_err(|e| Error::Usage(format!("cannot start the shell: {e}")))?;
    let history = std::env::var_os("HOME").map(|h| Path::new(&h).join(".recap_history"));
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    println!(
        "recap query: {} shard file{} in {} as table shards; \\? for help, \\q to quit",
        info.files.len(),
        if info.files.len() == 1 { "" } else { "s" },
        spec.display()
    );
    let mut buf = String::new();
    let mut timing = false;
    loop {
        let prompt = if buf.is_empty() { "recap> " } else { "   ... " };
        match rl.readline(prompt) {
            Ok(line) => {
                let trimmed = line.trim();
                if buf.is_empty() && trimmed.starts_with('\\') {
                    let _ = rl.add_history_entry(trimmed);
                    if !meta(ctx, info, trimmed, &mut timing).await? {
                        break;
                    }
                    continue;
                }
                buf.push_str(&line);
                buf.push('\n');
                if trimmed.ends_with(';') {
                    let _ = rl.add_history_entry(buf.trim());
                    for sql in split_statements(&buf) {
                        run_one(ctx, &sql, format, timing).await;
                    }
                    buf.clear();
                }
            }
            Err(ReadlineError::Interrupted) => buf.clear(),
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(Error::Usage(format!("shell: {e}"))),
        }
    }
    if let Some(h) = &history {
        let _ = rl.save_history(h);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_quotes_and_comments() {
        let s = split_statements("SELECT 'a;b' AS x; -- a comment; still comment\nSELECT 2;\n\n");
        assert_eq!(s, vec!["SELECT 'a;b' AS x".to_string(), "SELECT 2".to_string()]);
    }

    #[test]
    fn an_unfinished_statement_is_kept_for_the_next_line() {
        let (done, rest) = split_complete("SELECT 1; SELECT 'a;\n");
        assert_eq!(done, vec!["SELECT 1".to_string()]);
        let (done, rest) = split_complete(&format!("{rest}b' -- c;\n;\n"));
        assert_eq!(done, vec!["SELECT 'a;\nb'".to_string()]);
        assert!(rest.trim().is_empty());
    }
}
