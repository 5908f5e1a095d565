//! The `{placeholder}` templates of `dest_dir` and `install_command`: their
//! syntax (`{name}`, `{{`/`}}` literal braces), their expansion, the shell
//! quoting of a value, and the check that a placeholder stands where that
//! quoting holds (`quoting.rs`). Shared by [`crate::config`] (which checks a
//! template when the file is loaded) and [`crate::route`] (which fills it in);
//! it uses neither.

use std::collections::BTreeMap;

mod quoting;

pub use quoting::{check_placeholder_quoting, Unquotable};

/// Placeholders every route has (named regex groups come on top).
pub const BUILTIN_PLACEHOLDERS: &[&str] = &["name", "file", "dir", "host", "section"];

/// `{name}` placeholders in a template (`{{` and `}}` are literal braces).
pub fn placeholders(t: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = t.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '{' {
            if matches!(chars.peek(), Some((_, '{'))) {
                chars.next();
                continue;
            }
            if let Some(end) = t[i + 1..].find('}') {
                let name = &t[i + 1..i + 1 + end];
                if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    out.push(name.to_string());
                }
            }
        }
    }
    out
}

/// Quote a string for a POSIX shell: `'…'`, with `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
        && !s.starts_with('-')
    {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Replace `{placeholders}`; each value goes through `quote`. `{{`/`}}` are literal braces.
pub fn expand(
    template: &str,
    vars: &BTreeMap<String, String>,
    quote: impl Fn(&str) -> String,
) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let c = rest.as_bytes()[i];
        let after = &rest[i + 1..];
        if after.as_bytes().first() == Some(&c) {
            out.push(c as char);
            rest = &after[1..];
            continue;
        }
        if c == b'{' {
            if let Some(end) = after.find('}') {
                if let Some(v) = vars.get(&after[..end]) {
                    out.push_str(&quote(v));
                    rest = &after[end + 1..];
                    continue;
                }
            }
        }
        out.push(c as char);
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_hostile_names() {
        assert_eq!(shell_quote("plain-1.2.tar.gz"), "plain-1.2.tar.gz");
        assert_eq!(
            shell_quote("a b;$(rm -rf ~)'.tar.gz"),
            "'a b;$(rm -rf ~)'\\''.tar.gz'"
        );
        assert_eq!(shell_quote("-rf"), "'-rf'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn literal_braces_and_percent_in_names() {
        let vars: BTreeMap<String, String> = [("name".to_string(), "50%.zip".to_string())].into();
        assert_eq!(
            expand("{{x}} {name} {other}", &vars, shell_quote),
            "{x} 50%.zip {other}"
        );
    }
}
