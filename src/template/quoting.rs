//! Does a placeholder's quoting hold where it stands? A small shell lexer
//! over a template's tokens: a stack of frames (plain text, `$(…)`, `${…}`,
//! `"…"`), one method per frame and per special character.

use std::ops::ControlFlow;

/// Shell words that run (part of) their arguments as code, so a quoted
/// placeholder value reaching them is not safe: `eval`, `trap`, `alias`,
/// bash's arithmetic contexts (`let`, `((…))`, `[[ … -eq … ]]`, `declare -i`)
/// and the builtins that take a variable name (`read`, `unset`, `mapfile`,
/// `printf -v`, `test -v`), which expand `$(…)` in an array subscript.
const EVALUATING_WORDS: &[&str] = &[
    "eval",
    "let",
    "trap",
    "alias",
    "declare",
    "typeset",
    "[[",
    "read",
    "unset",
    "mapfile",
    "readarray",
];
/// `-v` right after one of these takes a variable name (see above).
const NAME_OPTION_WORDS: &[&str] = &["printf", "test", "["];

#[derive(Debug, Clone, PartialEq, Eq)]
enum TokKind {
    Char(char),
    Placeholder(String),
}

#[derive(Debug, Clone)]
struct Tok {
    kind: TokKind,
    /// Byte range in the template.
    start: usize,
    end: usize,
}

/// Split a template the way [`super::expand`] reads it: `{{` and `}}`
/// are literal braces, `{x}` is a placeholder when `x` is one of `names` or
/// looks like one (an unknown placeholder is reported on its own).
fn template_tokens(t: &str, names: &[&str]) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(c) = t[i..].chars().next() {
        let next = t[i + c.len_utf8()..].chars().next();
        if (c == '{' || c == '}') && next == Some(c) {
            out.push(Tok {
                kind: TokKind::Char(c),
                start: i,
                end: i + 2,
            });
            i += 2;
            continue;
        }
        if c == '{' {
            if let Some(len) = t[i + 1..].find('}') {
                let name = &t[i + 1..i + 1 + len];
                let looks = !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_alphanumeric() || "_.[]".contains(c));
                if names.contains(&name) || looks {
                    out.push(Tok {
                        kind: TokKind::Placeholder(name.to_string()),
                        start: i,
                        end: i + len + 2,
                    });
                    i += len + 2;
                    continue;
                }
            }
        }
        out.push(Tok {
            kind: TokKind::Char(c),
            start: i,
            end: i + c.len_utf8(),
        });
        i += c.len_utf8();
    }
    out
}

/// Where the lexer found a placeholder it cannot allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unquotable {
    pub placeholder: String,
    /// Where it is, as a phrase: `inside "…"`.
    pub place: String,
    /// The template rewritten so that the placeholder stands outside the
    /// quotes, when that is a mechanical fix.
    pub fix: Option<String>,
}

/// One level of the lexer's stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Plain shell text (the template's top level).
    Top,
    /// Inside `$(…)`, `<(…)` or `>(…)`, with this many open `(`.
    Subst(usize),
    /// Inside `${…}`.
    Param,
    /// Inside `"…"`.
    Double,
}

/// What a character's handler decided.
enum Step {
    /// Nothing special: the character is part of a word or ends one.
    Plain,
    /// The handler moved past what it read.
    Moved,
}

/// `Break` ends the check with its result.
type Flow = ControlFlow<Result<(), Unquotable>, Step>;

/// Check that every placeholder of a shell template stands where the
/// single-quoted value [`super::shell_quote`] gives it stays one literal
/// word: in plain unquoted text, not inside `'…'` or `"…"` (where the quotes
/// of the value are literal and `$(…)` in a file name would run), not after a
/// backslash or `$`, not inside `$(…)`, `` `…` ``, `${…}`, a comment or a
/// here-document, and not in a command that evaluates its arguments (`eval`,
/// `trap`, bash arithmetic). What the lexer cannot be sure of is refused.
pub fn check_placeholder_quoting(t: &str, names: &[&str]) -> Result<(), Unquotable> {
    let toks = template_tokens(t, names);
    if !toks
        .iter()
        .any(|x| matches!(x.kind, TokKind::Placeholder(_)))
    {
        return Ok(());
    }
    Lexer {
        t,
        toks,
        i: 0,
        stack: vec![Frame::Top],
        word: String::new(),
        prev_word: String::new(),
        at_word_start: true,
        evaluating: None,
        plain_placeholders: Vec::new(),
    }
    .run()
}

struct Lexer<'t> {
    t: &'t str,
    toks: Vec<Tok>,
    /// The token being read.
    i: usize,
    stack: Vec<Frame>,
    /// The unquoted word being read (a placeholder counts as `\0`).
    word: String,
    prev_word: String,
    at_word_start: bool,
    /// The first word seen that evaluates its arguments.
    evaluating: Option<String>,
    /// Placeholders found in plain text, allowed unless `evaluating`.
    plain_placeholders: Vec<usize>,
}

impl Lexer<'_> {
    fn run(mut self) -> Result<(), Unquotable> {
        while self.i < self.toks.len() {
            let frame = *self.stack.last().unwrap_or(&Frame::Top);
            let flow = if frame == Frame::Double {
                self.in_double()
            } else {
                self.unquoted(frame)
            };
            if let ControlFlow::Break(result) = flow {
                return result;
            }
        }
        self.finish()
    }

    /// After the last token: a template in a command that evaluates its
    /// arguments refuses its plain placeholders too.
    fn finish(mut self) -> Result<(), Unquotable> {
        let word = std::mem::take(&mut self.word);
        if !word.is_empty() && (EVALUATING_WORDS.contains(&word.as_str()) || word.starts_with("(("))
        {
            self.evaluating.get_or_insert(word);
        }
        if let (Some(w), Some(&j)) = (&self.evaluating, self.plain_placeholders.first()) {
            return Err(self.bad(
                j,
                &format!("in a command that uses `{w}`, which evaluates its arguments as code"),
                None,
            ));
        }
        Ok(())
    }

    /// The character of token `i`, if it is one (not a placeholder).
    fn ch(&self, i: usize) -> Option<char> {
        match self.toks.get(i).map(|x| &x.kind) {
            Some(TokKind::Char(c)) => Some(*c),
            _ => None,
        }
    }

    fn is_placeholder(&self, i: usize) -> bool {
        matches!(
            self.toks.get(i).map(|x| &x.kind),
            Some(TokKind::Placeholder(_))
        )
    }

    /// Token `i` (a placeholder) refused for `place`.
    fn bad(&self, i: usize, place: &str, fix: Option<String>) -> Unquotable {
        let name = match &self.toks[i].kind {
            TokKind::Placeholder(n) => n.clone(),
            TokKind::Char(_) => String::new(),
        };
        Unquotable {
            placeholder: name,
            place: place.to_string(),
            fix,
        }
    }

    /// End of the check: the first placeholder at or after `i` is refused
    /// for `place` (the lexer cannot follow the text after `i`).
    fn rest_refused(&self, i: usize, place: &str) -> Flow {
        let first = (i..self.toks.len()).find(|&j| self.is_placeholder(j));
        ControlFlow::Break(match first {
            Some(j) => Err(self.bad(j, place, None)),
            None => Ok(()),
        })
    }

    /// `"…"` or `'…'` around token `i`: close the quote before it, reopen after.
    fn requote(&self, i: usize, q: char) -> String {
        let t = self.t;
        let (s, e) = (self.toks[i].start, self.toks[i].end);
        let before = &t[..s];
        let after = &t[e..];
        let mut out = String::new();
        match before.strip_suffix(q) {
            Some(b) => out.push_str(b),
            None => {
                out.push_str(before);
                out.push(q);
            }
        }
        out.push_str(&t[s..e]);
        match after.strip_prefix(q) {
            Some(a) => out.push_str(a),
            None => {
                out.push(q);
                out.push_str(after);
            }
        }
        out
    }

    /// Move past `n` tokens; `word_start` is what follows.
    fn advance(&mut self, n: usize, word_start: bool) -> Flow {
        self.i += n;
        self.at_word_start = word_start;
        ControlFlow::Continue(Step::Moved)
    }

    fn push(&mut self, frame: Frame, n: usize, word_start: bool) -> Flow {
        self.stack.push(frame);
        self.advance(n, word_start)
    }

    /// A token inside `"…"`.
    fn in_double(&mut self) -> Flow {
        let i = self.i;
        let c = match &self.toks[i].kind {
            TokKind::Placeholder(_) => {
                return ControlFlow::Break(Err(self.bad(
                    i,
                    "inside \"…\"",
                    Some(self.requote(i, '"')),
                )));
            }
            TokKind::Char(c) => *c,
        };
        match c {
            '"' => {
                self.stack.pop();
                self.i += 1;
            }
            '\\' => {
                if self.is_placeholder(i + 1) {
                    return ControlFlow::Break(Err(self.bad(i + 1, "inside \"…\"", None)));
                }
                self.i += 2;
            }
            '`' => return self.rest_refused(i, "after a `…` command substitution"),
            '$' if self.ch(i + 1) == Some('(') => {
                self.stack.push(Frame::Subst(0));
                self.i += 2;
            }
            '$' if self.ch(i + 1) == Some('{') => {
                // "…${X-default}…": the quotes resume after its `}`
                self.stack.push(Frame::Param);
                self.i += 2;
            }
            _ => self.i += 1,
        }
        ControlFlow::Continue(Step::Moved)
    }

    /// A token in plain text, `$(…)` or `${…}`.
    fn unquoted(&mut self, frame: Frame) -> Flow {
        let c = match self.toks[self.i].kind {
            TokKind::Placeholder(_) => return self.placeholder(frame),
            TokKind::Char(c) => c,
        };
        let boundary = c.is_whitespace() || ";&|()<>".contains(c);
        if boundary && !self.word.is_empty() {
            self.end_word(frame)?;
        }
        if let Step::Plain = self.special(c, frame)? {
            if boundary {
                self.at_word_start = true;
            } else {
                self.word.push(c);
                self.at_word_start = false;
            }
            self.i += 1;
        }
        ControlFlow::Continue(Step::Moved)
    }

    /// An unquoted placeholder: allowed in plain text only.
    fn placeholder(&mut self, frame: Frame) -> Flow {
        let i = self.i;
        if frame != Frame::Top {
            let place = if frame == Frame::Param {
                "inside ${…}"
            } else {
                "inside $(…)"
            };
            return ControlFlow::Break(Err(self.bad(i, place, None)));
        }
        if i.checked_sub(1).and_then(|p| self.ch(p)) == Some('$') {
            return ControlFlow::Break(Err(self.bad(i, "right after a `$`", None)));
        }
        self.plain_placeholders.push(i);
        self.word.push('\u{0}');
        self.advance(1, false)
    }

    /// A word ended: is it one that evaluates its arguments?
    fn end_word(&mut self, frame: Frame) -> Flow {
        let word = &self.word;
        if EVALUATING_WORDS.contains(&word.as_str()) || word.starts_with("((") {
            self.evaluating.get_or_insert(word.clone());
        }
        if word == "-v" && NAME_OPTION_WORDS.contains(&self.prev_word.as_str()) {
            let w = format!("{} -v", self.prev_word);
            self.evaluating.get_or_insert(w);
        }
        self.prev_word = self.word.clone();
        if self.word == "case" && matches!(frame, Frame::Subst(_)) {
            return self.rest_refused(self.i, "after a `case` inside $(…)");
        }
        self.word.clear();
        ControlFlow::Continue(Step::Plain)
    }

    /// The characters that open or close something, or end the check.
    fn special(&mut self, c: char, frame: Frame) -> Flow {
        let i = self.i;
        let next = self.ch(i + 1);
        match c {
            '\'' => self.single_quoted(),
            '"' => {
                self.word.push('"');
                self.push(Frame::Double, 1, false)
            }
            '\\' => {
                if self.is_placeholder(i + 1) {
                    return ControlFlow::Break(Err(self.bad(
                        i + 1,
                        "right after a backslash",
                        None,
                    )));
                }
                self.word.push('\\');
                self.advance(2, false)
            }
            '`' => self.rest_refused(i, "after a `…` command substitution"),
            '#' if self.at_word_start => self.comment(),
            '$' => self.dollar(next, frame),
            '<' if next == Some('<') => self.rest_refused(i, "after a << here-document"),
            '<' | '>' if next == Some('(') => self.push(Frame::Subst(0), 2, true),
            '(' => {
                if self.at_word_start && next == Some('(') {
                    self.evaluating.get_or_insert("((".to_string());
                }
                if let Some(Frame::Subst(d)) = self.stack.last_mut() {
                    *d += 1;
                }
                ControlFlow::Continue(Step::Plain)
            }
            ')' => match self.stack.last_mut() {
                Some(Frame::Subst(0)) => {
                    self.stack.pop();
                    self.advance(1, false)
                }
                Some(Frame::Subst(d)) => {
                    *d -= 1;
                    ControlFlow::Continue(Step::Plain)
                }
                _ => ControlFlow::Continue(Step::Plain),
            },
            '{' if frame == Frame::Param => self.rest_refused(i, "after a { inside ${…}"),
            '}' if frame == Frame::Param => {
                self.stack.pop();
                self.advance(1, false)
            }
            _ => ControlFlow::Continue(Step::Plain),
        }
    }

    /// `'…'`: no placeholder may stand inside.
    fn single_quoted(&mut self) -> Flow {
        let i = self.i;
        let close = (i + 1..self.toks.len()).find(|&j| self.ch(j) == Some('\''));
        let end = close.unwrap_or(self.toks.len());
        if let Some(j) = (i + 1..end).find(|&j| self.ch(j).is_none()) {
            return ControlFlow::Break(Err(self.bad(j, "inside '…'", Some(self.requote(j, '\'')))));
        }
        self.word.push('\'');
        self.i = end + 1;
        self.at_word_start = false;
        ControlFlow::Continue(Step::Moved)
    }

    /// `# …` to the end of the line: no placeholder may stand inside.
    fn comment(&mut self) -> Flow {
        let i = self.i;
        let end = (i..self.toks.len())
            .find(|&j| self.ch(j) == Some('\n'))
            .unwrap_or(self.toks.len());
        if let Some(j) = (i..end).find(|&j| self.ch(j).is_none()) {
            return ControlFlow::Break(Err(self.bad(j, "inside a # comment", None)));
        }
        self.i = end;
        ControlFlow::Continue(Step::Moved)
    }

    /// `$` followed by `(`, `{`, `'` or `"`; else a plain character.
    fn dollar(&mut self, next: Option<char>, frame: Frame) -> Flow {
        match next {
            Some('(') => self.push(Frame::Subst(0), 2, false),
            Some('{') if frame != Frame::Param => self.push(Frame::Param, 2, false),
            Some('{') => self.rest_refused(self.i, "after a nested ${…}"),
            Some('\'') => self.rest_refused(self.i, "after a $'…' string"),
            Some('"') => self.push(Frame::Double, 2, false),
            _ => ControlFlow::Continue(Step::Plain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoting(t: &str) -> Result<(), Unquotable> {
        check_placeholder_quoting(t, &["name", "file", "dir", "host", "section", "app"])
    }

    #[test]
    fn placeholders_in_plain_unquoted_text_are_allowed() {
        for t in [
            "tar xzf {name}",
            "tar xzf {name} && ln -sfn {dir} /srv/{app}/current",
            "echo \"installing \"{name}",
            "echo 'x'{name}'y' \"$HOME\"",
            "cd $(dirname /x) && cp {name} \"$(date)\"/x",
            "cp {name} ${{HOME}}/x && cp {file} ${{HOME}}/y",
            "if [ {name} = b-slow ]; then sleep 30; fi; echo \"$0\" > {name}.shell",
            "printf '%s' {file} > {name}.path",
            "echo {{name}} \"{{name}}\" '{{x}}'",
            "( cd /x && tar xzf {file} )",
            "case {name} in *.tgz) tar xzf {name};; esac",
            "echo a\n{name} b",
            "x={name} y=a#b {name}#c",
            "sha256sum {name} > {name}.installed && echo host=$H >> {name}.installed",
            "no placeholder: echo \"$(x)\" `y` <<EOF",
            "[ -f {name} ] && cp -v {name} /x && printf '%s\\n' {name}",
            "echo \"${LEAK-unset}\" \"$(umask)\" > {file}.env",
        ] {
            assert_eq!(quoting(t), Ok(()), "{t}");
        }
    }

    #[test]
    fn placeholders_inside_quotes_and_expansions_are_refused() {
        for (t, place) in [
            ("echo \"installing {name}\"", "inside \"…\""),
            ("echo '{name}'", "inside '…'"),
            ("echo \"a\" \"b {name} c\"", "inside \"…\""),
            ("echo \"$(echo \"{name}\")\"", "inside \"…\""),
            ("x=$(basename {file})", "inside $(…)"),
            ("echo \"$({name})\"", "inside $(…)"),
            ("cat <(echo {name})", "inside $(…)"),
            ("echo `basename {file}`", "`…`"),
            ("echo `date` {name}", "`…`"),
            ("echo ${{x:-{name}}}", "inside ${…}"),
            ("cat <<EOF\n{name}\nEOF", "here-document"),
            ("cat <<<{name}", "here-document"),
            ("echo \\{name}", "backslash"),
            ("echo ${name}", "`$`"),
            ("echo $'{name}'", "$'…'"),
            ("true # {name}", "comment"),
            ("eval tar xzf {name}", "`eval`"),
            ("tar xzf {name}; trap 'rm x' EXIT", "`trap`"),
            ("[[ {name} -eq 1 ]]", "`[[`"),
            ("(( {name} ))", "`((`"),
            ("let x={name}", "`let`"),
            ("read {name} < /dev/null", "`read`"),
            ("printf -v {name} x", "`printf -v`"),
            ("[ -v {name} ]", "`[ -v`"),
        ] {
            let e = quoting(t).expect_err(t);
            assert!(e.place.contains(place), "{t}: {e:?}");
        }
    }
}
