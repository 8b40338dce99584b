//! Key paths (`listener[1].address`), the problems found at them, and finding them in a parsed
//! TOML document.
//!
//! A path is looked up segment by segment in a [`toml_edit::Document`], which keeps the byte
//! spans of keys, table headers and values. When a segment does not exist (a missing field, a
//! default section) the position of the nearest existing parent is used.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{Item, Table, TableLike, Value};

use super::{Problem, Severity};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A key in a table.
    Key(String),
    /// An element of an array or of an array of tables.
    Index(usize),
}

/// A key path such as `listener[1].address`; empty for the whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// The whole file.
    pub fn root() -> KeyPath {
        KeyPath(Vec::new())
    }

    /// This path followed by `key`.
    pub fn key(&self, key: &str) -> KeyPath {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.to_string()));
        next
    }

    /// This path followed by element `index`.
    pub fn index(&self, index: usize) -> KeyPath {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }

    /// Appends one segment.
    pub fn push(&mut self, segment: Segment) {
        self.0.push(segment);
    }

    /// Parses the dotted form produced by [`Display`](fmt::Display), e.g. `defaults.mode` or
    /// `listener[1].address`.
    pub fn parse(text: &str) -> KeyPath {
        let mut path = KeyPath::root();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let mut pieces = part.split('[');
            if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
                path.push(Segment::Key(key.to_string()));
            }
            for index in pieces {
                match index.trim_end_matches(']').parse() {
                    Ok(i) => path.push(Segment::Index(i)),
                    Err(_) => path.push(Segment::Key(format!("[{index}"))),
                }
            }
        }
        path
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> &[Segment] {
        &self.0
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A node of the document while walking a path.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn table_like(self) -> Option<&'a dyn TableLike> {
        match self {
            Node::Item(item) => item.as_table_like(),
            Node::Table(table) => Some(table),
            Node::Value(value) => value.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    /// The child named `key`: the span of the key and the child node.
    fn child_key(self, key: &str) -> Option<(Option<Range<usize>>, Node<'a>)> {
        let (key, item) = self.table_like()?.get_key_value(key)?;
        Some((key.span(), Node::Item(item)))
    }

    /// Element `index`: the span of the element (a `[[header]]` or a value) and the element.
    fn child_index(self, index: usize) -> Option<(Option<Range<usize>>, Node<'a>)> {
        let array = match self {
            Node::Item(Item::ArrayOfTables(tables)) => {
                let table = tables.get(index)?;
                return Some((table.span(), Node::Table(table)));
            }
            Node::Item(Item::Value(Value::Array(array))) | Node::Value(Value::Array(array)) => {
                array
            }
            _ => return None,
        };
        let value = array.get(index)?;
        Some((value.span(), Node::Value(value)))
    }
}

/// Byte span of `path` in `doc`, or of its nearest existing parent; `None` for the root.
pub fn span_of(doc: &toml_edit::Document<String>, path: &KeyPath) -> Option<Range<usize>> {
    let mut node = Node::Item(doc.as_item());
    let mut best = None;
    for segment in path.segments() {
        let step = match segment {
            Segment::Key(key) => node.child_key(key),
            Segment::Index(index) => node.child_index(*index),
        };
        let Some((span, child)) = step else { break };
        best = span.or(best);
        node = child;
    }
    best
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Problems found in one file, before they are given a position.
#[derive(Debug, Default)]
pub struct Findings(Vec<Finding>);

#[derive(Debug)]
struct Finding {
    severity: Severity,
    path: KeyPath,
    message: String,
}

impl Findings {
    /// Records an error at `path`.
    pub fn error(&mut self, path: KeyPath, message: impl Into<String>) {
        self.push(Severity::Error, path, message.into());
    }

    /// Records a warning at `path`.
    pub fn warn(&mut self, path: KeyPath, message: impl Into<String>) {
        self.push(Severity::Warning, path, message.into());
    }

    fn push(&mut self, severity: Severity, path: KeyPath, message: String) {
        self.0.push(Finding {
            severity,
            path,
            message,
        });
    }
}

/// A parsed file: its name, text and the span-keeping document used to locate problems.
pub struct Source {
    file: PathBuf,
    text: String,
    doc: toml_edit::Document<String>,
}

impl Source {
    /// Parses `bytes` as TOML; a syntax error becomes the one problem reported for the file.
    pub fn parse(file: &Path, bytes: Vec<u8>) -> Result<(Source, toml::Table), Vec<Problem>> {
        let text = String::from_utf8(bytes).map_err(|e| {
            let offset = e.utf8_error().valid_up_to();
            let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
            let message = "the file is not valid UTF-8".to_string();
            vec![syntax_problem(file, &text, Some(offset), message)]
        })?;
        let doc = toml_edit::Document::parse(text.clone()).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            vec![syntax_problem(file, &text, offset, e.message().to_string())]
        })?;
        let table = text.parse::<toml::Table>().map_err(|e| {
            let offset = e.span().map(|s| s.start);
            vec![syntax_problem(file, &text, offset, e.message().to_string())]
        })?;
        let source = Source {
            file: file.to_path_buf(),
            text,
            doc,
        };
        Ok((source, table))
    }

    /// Gives each finding its position in this file, in file order.
    pub fn problems(&self, findings: Findings) -> Vec<Problem> {
        let mut problems: Vec<Problem> = findings
            .0
            .into_iter()
            .map(|f| Problem {
                severity: f.severity,
                file: self.file.clone(),
                position: span_of(&self.doc, &f.path).map(|s| line_col(&self.text, s.start)),
                path: f.path.to_string(),
                message: f.message,
            })
            .collect();
        problems.sort_by_key(|p| p.position);
        problems
    }
}

fn syntax_problem(file: &Path, text: &str, offset: Option<usize>, message: String) -> Problem {
    Problem {
        severity: Severity::Error,
        file: file.to_path_buf(),
        path: String::new(),
        position: offset.map(|o| line_col(text, o)),
        message: format!("invalid TOML: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# comment\n[a]\nx = 1\n[[l]]\ny = 2\n[[l]]\ny = 3\nz.w = 4\narr = [1, 2]\n";

    fn position(path: &str) -> Option<(usize, usize)> {
        let doc = toml_edit::Document::parse(DOC.to_string()).expect("valid");
        span_of(&doc, &KeyPath::parse(path)).map(|s| line_col(DOC, s.start))
    }

    #[test]
    fn paths_round_trip() {
        for text in [
            "a",
            "a.b",
            "listener[1].address",
            "relay.trusted_networks[0]",
        ] {
            assert_eq!(KeyPath::parse(text).to_string(), text);
        }
    }

    #[test]
    fn finds_keys_headers_and_elements() {
        assert_eq!(position("a"), Some((2, 2)));
        assert_eq!(position("a.x"), Some((3, 1)));
        assert_eq!(position("l[1]"), Some((6, 1)));
        assert_eq!(position("l[1].y"), Some((7, 1)));
        assert_eq!(position("l[1].z.w"), Some((8, 3)));
        assert_eq!(position("l[1].arr[1]"), Some((9, 11)));
    }

    #[test]
    fn falls_back_to_the_nearest_parent() {
        assert_eq!(position("a.missing"), Some((3 - 1, 2)));
        assert_eq!(position("l[7].y"), Some((4, 3)));
        assert_eq!(position("nothing"), None);
    }
}
