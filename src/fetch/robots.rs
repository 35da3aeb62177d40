//! robots.txt as RFC 9309 reads it: groups of `user-agent` lines followed by `allow` /
//! `disallow` rules; the group whose product token matches ours (case-insensitive), else the `*`
//! group, else everything is allowed. The longest matching rule wins, `allow` on a tie; `*`
//! matches any run of characters and a final `$` anchors the end. Lines we do not know
//! (`sitemap`, `crawl-delay`, ...) are skipped, as the RFC asks.

/// One `allow` or `disallow` line of the group that applies to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub pattern: String,
}

/// What a site's robots.txt says about us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Robots {
    /// Rules of the group that applies to our token (`agent` says which group).
    Rules { agent: String, rules: Vec<Rule> },
    /// No robots.txt (4xx) or an unusable one: everything allowed.
    AllowAll,
    /// The site could not say (5xx, 429): RFC 9309 §2.3.1.3 treats it as fully disallowed.
    DisallowAll { why: String },
}

impl Robots {
    /// Parse a robots.txt body for the product token `agent` (e.g. `recap`).
    pub fn parse(body: &str, agent: &str) -> Robots {
        let agent = agent.to_ascii_lowercase();
        // (agents of the group, its rules); consecutive user-agent lines open one group.
        let mut groups: Vec<(Vec<String>, Vec<Rule>)> = Vec::new();
        let mut last_was_agent = false;
        for line in body.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let Some((key, value)) = line.split_once(':') else { continue };
            let key = key.trim().to_ascii_lowercase();
            let value = value.trim();
            match key.as_str() {
                "user-agent" => {
                    // "Googlebot/2.1" -> "googlebot": the product token is the part before '/' or space.
                    let token = value.split(['/', ' ']).next().unwrap_or("").to_ascii_lowercase();
                    if !last_was_agent || groups.is_empty() {
                        groups.push((Vec::new(), Vec::new()));
                    }
                    groups.last_mut().expect("pushed").0.push(token);
                    last_was_agent = true;
                }
                "allow" | "disallow" => {
                    last_was_agent = false;
                    let Some(group) = groups.last_mut() else { continue };
                    // An empty `disallow:` allows everything: it is no rule at all.
                    if value.is_empty() {
                        continue;
                    }
                    group.1.push(Rule { allow: key == "allow", pattern: value.to_string() });
                }
                _ => last_was_agent = false,
            }
        }
        // Every group naming our token merges (RFC 9309 §2.2.1); else every `*` group.
        for wanted in [agent.as_str(), "*"] {
            let rules: Vec<Rule> =
                groups.iter().filter(|(agents, _)| agents.iter().any(|a| a == wanted)).flat_map(|(_, r)| r.iter().cloned()).collect();
            let named = groups.iter().any(|(agents, _)| agents.iter().any(|a| a == wanted));
            if named {
                return Robots::Rules { agent: wanted.to_string(), rules };
            }
        }
        Robots::AllowAll
    }

    /// `None` when `path` (path and query, e.g. `/a/b.jpg?x=1`) may be fetched; otherwise the
    /// reason a row gets, naming the rule.
    pub fn refusal(&self, path: &str) -> Option<String> {
        match self {
            Robots::AllowAll => None,
            Robots::DisallowAll { why } => Some(format!("robots.txt: {why}")),
            Robots::Rules { agent, rules } => {
                if path == "/robots.txt" {
                    return None;
                }
                let mut best: Option<&Rule> = None;
                for r in rules {
                    if matches(&r.pattern, path) {
                        let better = match best {
                            None => true,
                            Some(b) => r.pattern.len() > b.pattern.len() || (r.pattern.len() == b.pattern.len() && r.allow && !b.allow),
                        };
                        if better {
                            best = Some(r);
                        }
                    }
                }
                match best {
                    Some(r) if !r.allow => Some(format!("robots.txt: Disallow: {} (user-agent {agent})", r.pattern)),
                    _ => None,
                }
            }
        }
    }
}

/// Does the robots.txt `pattern` match `path` from its start? `*` is any run, a final `$` the end.
fn matches(pattern: &str, path: &str) -> bool {
    let (pattern, anchored) = match pattern.strip_suffix('$') {
        Some(p) => (p, true),
        None => (pattern, false),
    };
    let p = pattern.as_bytes();
    let s = path.as_bytes();
    // Iterative wildcard match with one backtrack point (the last `*`).
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pi == p.len() {
            if !anchored || si == s.len() {
                return true;
            }
        } else if p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
            continue;
        } else if si < s.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
            continue;
        }
        // Mismatch (or anchored end not reached): let the last `*` eat one more byte.
        match star {
            Some((sp, ss)) if ss < s.len() => {
                star = Some((sp, ss + 1));
                pi = sp + 1;
                si = ss + 1;
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_and_anchors() {
        assert!(matches("/", "/anything"));
        assert!(matches("/fish", "/fish.html"));
        assert!(matches("/fish", "/fishheads/yummy.html"));
        assert!(!matches("/fish", "/Fish.asp"));
        assert!(matches("/*.php", "/folder/filename.php?parameters"));
        assert!(matches("/*.php$", "/filename.php"));
        assert!(!matches("/*.php$", "/filename.php?parameters"));
        assert!(!matches("/*.php$", "/filename.php5"));
        assert!(matches("/fish*.php", "/fishheads/catfish.php?parameters"));
        assert!(!matches("/fish*.php", "/Fish.PHP"));
        assert!(matches("*", ""));
        assert!(matches("/a*b*c$", "/aXbYbc"));
    }

    #[test]
    fn groups_precedence_and_reasons() {
        let txt = "# comment\nUser-agent: *\nDisallow: /\n\nUser-agent: Recap/1.0\nUser-agent: otherbot\nDisallow: /private/\nAllow: /private/ok/\nDisallow: /*.gif$\nSitemap: https://x/s.xml\n";
        let r = Robots::parse(txt, "recap");
        assert_eq!(r.refusal("/img/a.jpg"), None, "our own group replaces '*'");
        assert_eq!(r.refusal("/private/a.jpg").as_deref(), Some("robots.txt: Disallow: /private/ (user-agent recap)"));
        assert_eq!(r.refusal("/private/ok/a.jpg"), None, "longer allow wins");
        assert!(r.refusal("/x/y.gif").is_some());
        assert_eq!(r.refusal("/x/y.gif?v=2"), None);
        let other = Robots::parse(txt, "somebot");
        assert_eq!(other.refusal("/img/a.jpg").as_deref(), Some("robots.txt: Disallow: / (user-agent *)"));
        assert_eq!(other.refusal("/robots.txt"), None);
    }

    #[test]
    fn ties_empty_rules_and_no_group() {
        let r = Robots::parse("User-agent: *\nDisallow: /page\nAllow: /page\n", "recap");
        assert_eq!(r.refusal("/page"), None, "allow wins a tie");
        let r = Robots::parse("User-agent: *\nDisallow:\n", "recap");
        assert_eq!(r.refusal("/anything"), None);
        assert_eq!(Robots::parse("Disallow: /\n", "recap"), Robots::AllowAll, "rules outside any group are ignored");
        assert_eq!(Robots::parse("User-agent: googlebot\nDisallow: /\n", "recap"), Robots::AllowAll);
        // Two groups for the same agent merge.
        let r = Robots::parse("User-agent: recap\nDisallow: /a\n\nUser-agent: recap\nDisallow: /b\n", "recap");
        assert!(r.refusal("/a1").is_some() && r.refusal("/b1").is_some());
    }
}
