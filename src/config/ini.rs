//! INI text → raw sections, in file order, names and values verbatim.

use std::path::Path;

use super::Problem;

#[derive(Debug, Clone)]
pub struct RawEntry {
    pub key: String,
    pub value: String,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct RawSection {
    pub name: String,
    pub line: usize,
    pub entries: Vec<RawEntry>,
}

/// Name given to a section whose header was unreadable: its keys are
/// skipped instead of being blamed on the section before it.
pub(super) const BROKEN: &str = "\u{0}broken";

impl RawSection {
    fn broken(line: usize) -> RawSection {
        RawSection {
            name: BROKEN.to_string(),
            line,
            entries: Vec::new(),
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<&RawEntry> {
        self.entries.iter().find(|e| e.key == key)
    }
}

/// Parse INI text into sections, in file order. Problems are appended to `problems`.
pub fn parse_ini(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<RawSection> {
    let mut reader = Reader {
        file,
        problems,
        sections: Vec::new(),
        last_entry: None,
    };
    for (i, raw) in text.lines().enumerate() {
        reader.line(i + 1, raw.strip_suffix('\r').unwrap_or(raw));
    }
    reader.sections
}

struct Reader<'a> {
    file: &'a Path,
    problems: &'a mut Vec<Problem>,
    sections: Vec<RawSection>,
    /// (section index, entry index) of the last key, for continuation lines
    last_entry: Option<(usize, usize)>,
}

impl Reader<'_> {
    fn err(&mut self, line: usize, msg: String) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            msg,
        })
    }

    fn line(&mut self, lineno: usize, line: &str) {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            // a blank line ends a multi-line value (Python keeps it only if more
            // indented lines follow; we simply end the value)
            self.last_entry = None;
            return;
        }
        if trimmed.starts_with('#') || trimmed.starts_with(';') {
            return;
        }
        let indented = line.starts_with(' ') || line.starts_with('\t');
        if indented && self.continue_value(trimmed) {
            return;
        }
        if trimmed.starts_with('[') {
            self.last_entry = None;
            self.header(lineno, trimmed);
        } else {
            self.entry(lineno, trimmed);
        }
    }

    /// An indented line after a key continues its value.
    fn continue_value(&mut self, trimmed: &str) -> bool {
        let Some((s, e)) = self.last_entry else {
            return false;
        };
        let entry = &mut self.sections[s].entries[e];
        if entry.value.is_empty() {
            entry.value = trimmed.to_string();
        } else {
            entry.value.push('\n');
            entry.value.push_str(trimmed);
        }
        true
    }

    /// `[name]`.
    fn header(&mut self, lineno: usize, trimmed: &str) {
        if !trimmed.ends_with(']') || trimmed.len() < 2 {
            self.err(
                lineno,
                format!("section header must end with ']': {trimmed}"),
            );
            self.sections.push(RawSection::broken(lineno));
            return;
        }
        let name = trimmed[1..trimmed.len() - 1].trim().to_string();
        if name.is_empty() {
            self.err(lineno, "empty section name []".to_string());
            self.sections.push(RawSection::broken(lineno));
            return;
        }
        let first = self
            .sections
            .iter()
            .find(|s| s.name == name && s.name != BROKEN)
            .map(|s| s.line);
        if let Some(first) = first {
            self.err(
                lineno,
                format!("duplicate section [{name}] (first defined on line {first})"),
            );
            // keep parsing its keys into a throwaway section so they are checked too
        }
        self.sections.push(RawSection {
            name,
            line: lineno,
            entries: Vec::new(),
        });
    }

    /// `key = value` or `key: value`.
    fn entry(&mut self, lineno: usize, trimmed: &str) {
        let Some(pos) = trimmed.find(['=', ':']) else {
            self.err(
                lineno,
                format!("expected `key = value`, `[section]` or a comment, found: {trimmed}"),
            );
            return;
        };
        let key = trimmed[..pos].trim().to_string();
        let value = trimmed[pos + 1..].trim().to_string();
        if key.is_empty() {
            self.err(lineno, format!("empty key name: {trimmed}"));
            return;
        }
        let Some(sidx) = self.sections.len().checked_sub(1) else {
            self.err(lineno, format!("key `{key}` before any [section] header"));
            return;
        };
        let section = &self.sections[sidx];
        if section.name == BROKEN {
            return;
        }
        if let Some(prev) = section.get(&key) {
            let msg = format!(
                "[{}] duplicate key `{key}` (first set on line {})",
                section.name, prev.line
            );
            self.err(lineno, msg);
            return;
        }
        let section = &mut self.sections[sidx];
        section.entries.push(RawEntry {
            key,
            value,
            line: lineno,
        });
        self.last_entry = Some((sidx, section.entries.len() - 1));
    }
}
