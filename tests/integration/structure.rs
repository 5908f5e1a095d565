//! The shape ARCHITECTURE.md promises, checked over `src/`: no import cycle
//! between modules (a module is a top-level file or directory of `src/`;
//! it uses another when its non-test code names `crate::other`), and no
//! function of non-test code longer than 80 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// `src/**/*.rs`, sorted.
fn sources() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The module a source file belongs to: `src/config/keys.rs` → `config`.
fn module_of(p: &Path) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rel = p.strip_prefix(&src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// A line without its string and char literals and its `//` comment.
fn code_of(line: &str) -> String {
    static LITERALS: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let literals =
        LITERALS.get_or_init(|| regex::Regex::new(r#""(\\.|[^"\\])*"|'(\\.|[^'\\])'"#).unwrap());
    let code = literals.replace_all(line, "\"\"").into_owned();
    match code.find("//") {
        Some(i) => code[..i].to_string(),
        None => code,
    }
}

/// The file's lines before its `#[cfg(test)]` module, as code.
fn non_test_code(p: &Path) -> Vec<String> {
    let text = fs::read_to_string(p).unwrap();
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .map(code_of)
        .collect()
}

#[test]
fn modules_use_each_other_without_cycles() {
    let single = regex::Regex::new(r"crate::(\w+)").unwrap();
    let group = regex::Regex::new(r"crate::\{([^}]*)").unwrap();
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in sources() {
        let m = module_of(&p);
        if m == "main" || m == "lib" {
            continue;
        }
        let code = non_test_code(&p).join("\n");
        let mut named: Vec<String> = single
            .captures_iter(&code)
            .map(|c| c[1].to_string())
            .collect();
        for c in group.captures_iter(&code) {
            for item in c[1].split(',') {
                let word: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                named.push(word);
            }
        }
        let entry = uses.entry(m.clone()).or_default();
        entry.extend(named.into_iter().filter(|n| !n.is_empty() && *n != m));
    }
    assert!(uses.len() > 10, "modules found: {uses:?}");
    assert!(uses["job"].contains("plan"), "{uses:?}");
    // depth-first search; a module met again on the current path is a cycle
    fn visit(
        m: &str,
        uses: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        path.push(m.to_string());
        for next in uses.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, uses, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in uses.keys() {
        let cycle = visit(m, &uses, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" → ")
        );
    }
    assert!(
        !uses.values().any(|u| u.contains("cli")),
        "a module imports the CLI: {uses:?}"
    );
}

#[test]
fn no_function_is_longer_than_80_lines() {
    let start = regex::Regex::new(r"^\s*(pub(\([^)]*\))? )?(const )?(unsafe )?fn (\w+)").unwrap();
    let mut long = Vec::new();
    let mut seen = 0;
    for p in sources() {
        let lines = non_test_code(&p);
        let mut i = 0;
        while i < lines.len() {
            let Some(c) = start.captures(&lines[i]) else {
                i += 1;
                continue;
            };
            seen += 1;
            let (mut depth, mut opened, mut j) = (0i32, false, i);
            while j < lines.len() {
                for ch in lines[j].chars() {
                    match ch {
                        '{' => (depth, opened) = (depth + 1, true),
                        '}' => depth -= 1,
                        ';' if !opened && depth == 0 => break,
                        _ => {}
                    }
                }
                if (opened && depth == 0) || (!opened && lines[j].trim_end().ends_with(';')) {
                    break;
                }
                j += 1;
            }
            if j + 1 - i > 80 {
                long.push(format!("{}: {} ({} lines)", p.display(), &c[5], j + 1 - i));
            }
            i = j + 1;
        }
    }
    assert!(seen > 100, "functions found: {seen}");
    assert!(
        long.is_empty(),
        "functions over 80 lines:\n{}",
        long.join("\n")
    );
}
