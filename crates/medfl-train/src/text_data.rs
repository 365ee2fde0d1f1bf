//! JSON-lines text datasets (one object a line, a text field and a label field) and the
//! labelled texts a text model trains on.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::data::permutation;
use crate::TrainError;

/// Longest line accepted, in bytes. A longer one is an error naming its line: it is far more
/// likely a broken export (a whole file on one line) than a clinical note.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A JSON-lines file: one JSON object per non-blank line.
#[derive(Debug, Clone)]
pub struct TextTable {
    path: PathBuf,
    /// `(1-based line, object)` for every non-blank line.
    records: Vec<(u64, Map<String, Value>)>,
    /// Every key that appears in some object, sorted.
    fields: Vec<String>,
}

/// Lines left out of a task's examples, each kind counted, with the first line of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Lines whose text is empty or only whitespace.
    pub empty_text: usize,
    /// First such line.
    pub first_empty_text: Option<u64>,
    /// Lines whose label is not one of the task's labels.
    pub unknown_label: usize,
    /// First such line.
    pub first_unknown_label: Option<u64>,
}

impl Skipped {
    /// Lines skipped in all.
    pub fn total(&self) -> usize {
        self.empty_text + self.unknown_label
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = |l: Option<u64>| l.map_or(String::new(), |l| format!(", first at line {l}"));
        write!(
            f,
            "{} with empty text{}; {} with a label outside the task{}",
            self.empty_text,
            line(self.first_empty_text),
            self.unknown_label,
            line(self.first_unknown_label)
        )
    }
}

impl TextTable {
    /// Reads a JSON-lines file.
    pub fn load_jsonl(path: &Path) -> Result<Self, TrainError> {
        let file = std::fs::File::open(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::read_jsonl(path, file)
    }

    /// Reads JSON lines from any reader; `path` names it in errors. Blank lines are ignored;
    /// invalid UTF-8, invalid JSON, a value that is not an object or a line over
    /// [`MAX_LINE_BYTES`] is an error naming the line.
    pub fn read_jsonl(path: &Path, reader: impl Read) -> Result<Self, TrainError> {
        let data_err = |line: u64, message: String| TrainError::Data {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut reader = BufReader::new(reader);
        let mut records = Vec::new();
        let mut fields = BTreeSet::new();
        let mut buf = Vec::new();
        let mut line = 0u64;
        loop {
            buf.clear();
            line += 1;
            // Reading at most one byte past the limit bounds memory on a file with no newlines.
            let read = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|source| TrainError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
            if read == 0 {
                break;
            }
            if buf.len() > MAX_LINE_BYTES && buf.last() != Some(&b'\n') {
                return Err(data_err(
                    line,
                    format!("line is longer than {MAX_LINE_BYTES} bytes"),
                ));
            }
            let text = std::str::from_utf8(&buf).map_err(|e| {
                data_err(
                    line,
                    format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
                )
            })?;
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let object = match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(object)) => object,
                Ok(other) => {
                    return Err(data_err(
                        line,
                        format!("expected a JSON object, found {}", json_kind(&other)),
                    ))
                }
                Err(e) => return Err(data_err(line, format!("invalid JSON: {e}"))),
            };
            fields.extend(object.keys().cloned());
            records.push((line, object));
        }
        if records.is_empty() {
            return Err(data_err(1, "no JSON objects in the file".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            records,
            fields: fields.into_iter().collect(),
        })
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every field name that appears, sorted: what a site tells the coordinator.
    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are none (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The string value of `field` on every record (numbers and booleans as written; absent or
    /// other values as an empty string).
    pub fn column(&self, field: &str) -> Vec<String> {
        self.records
            .iter()
            .map(|(_, o)| scalar(o.get(field)).unwrap_or_default())
            .collect()
    }

    /// The records at `rows`, in that order.
    pub fn subset(&self, rows: &[usize]) -> TextTable {
        TextTable {
            path: self.path.clone(),
            records: rows.iter().map(|&i| self.records[i].clone()).collect(),
            fields: self.fields.clone(),
        }
    }

    /// Writes the records as JSON lines.
    pub fn write_jsonl(&self, path: &Path) -> Result<(), TrainError> {
        let io = |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut out = String::new();
        for (_, object) in &self.records {
            out.push_str(&Value::Object(object.clone()).to_string());
            out.push('\n');
        }
        std::fs::write(path, out).map_err(io)
    }

    /// The task's examples: `text` and `label` of every record, with `labels[i]` as class `i`.
    /// A record missing either field, or with a non-string text, is an error naming its line;
    /// empty texts and labels outside `labels` are skipped and counted (a site's file may hold
    /// classes a study leaves out).
    pub fn examples(
        &self,
        text: &str,
        label: &str,
        labels: &[String],
    ) -> Result<(TextExamples, Skipped), TrainError> {
        let data_err = |line: u64, message: String| TrainError::Data {
            path: self.path.clone(),
            line,
            message,
        };
        let mut out = TextExamples::default();
        let mut skipped = Skipped::default();
        for (line, object) in &self.records {
            let body = match object.get(text) {
                Some(Value::String(s)) => s,
                Some(other) => {
                    return Err(data_err(
                        *line,
                        format!("field `{text}` is {}, not a string", json_kind(other)),
                    ))
                }
                None => return Err(data_err(*line, format!("no field `{text}`"))),
            };
            let Some(class) = scalar(object.get(label)) else {
                return Err(data_err(
                    *line,
                    format!("no string or number in field `{label}`"),
                ));
            };
            if body.trim().is_empty() {
                skipped.empty_text += 1;
                skipped.first_empty_text.get_or_insert(*line);
                continue;
            }
            let Some(index) = labels.iter().position(|l| *l == class) else {
                skipped.unknown_label += 1;
                skipped.first_unknown_label.get_or_insert(*line);
                continue;
            };
            out.texts.push(body.clone());
            out.labels.push(index as u32);
        }
        if out.is_empty() {
            return Err(TrainError::Task(format!(
                "{}: no usable examples ({skipped})",
                self.path.display()
            )));
        }
        Ok((out, skipped))
    }
}

/// A JSON scalar as text: strings as they are, numbers and booleans as written.
fn scalar(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Labelled texts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextExamples {
    /// The texts.
    pub texts: Vec<String>,
    /// Class index of each text.
    pub labels: Vec<u32>,
}

impl TextExamples {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> TextExamples {
        TextExamples {
            texts: indices.iter().map(|&i| self.texts[i].clone()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// All examples of `parts`, in order.
    pub fn concat(parts: &[&TextExamples]) -> TextExamples {
        TextExamples {
            texts: parts.iter().flat_map(|p| p.texts.iter().cloned()).collect(),
            labels: parts
                .iter()
                .flat_map(|p| p.labels.iter().copied())
                .collect(),
        }
    }

    /// Splits off a shuffled `fraction` as validation, as [`crate::Examples::split`] does.
    /// Returns `(train, validation)`.
    pub fn split(&self, fraction: f64, seed: u64) -> (TextExamples, TextExamples) {
        let order = permutation(self.len(), seed);
        let n_val = (self.len() as f64 * fraction).round() as usize;
        let n_val = n_val.min(self.len().saturating_sub(1));
        (self.select(&order[n_val..]), self.select(&order[..n_val]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &[u8]) -> Result<TextTable, TrainError> {
        TextTable::read_jsonl(Path::new("notes.jsonl"), text)
    }

    fn labels() -> Vec<String> {
        vec!["circulatory".into(), "neoplasms".into()]
    }

    #[test]
    fn reads_objects_fields_and_examples() {
        let t = read(
            b"{\"text\": \"Hypertension\", \"label\": \"circulatory\", \"code\": \"I10\"}\n\n\
              {\"text\": \"Melanoma\", \"label\": \"neoplasms\"}\n\
              {\"text\": \"  \", \"label\": \"neoplasms\"}\n\
              {\"text\": \"Otitis\", \"label\": \"ear\"}\n",
        )
        .unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t.fields(), ["code", "label", "text"]);
        let (ex, skipped) = t.examples("text", "label", &labels()).unwrap();
        assert_eq!(ex.texts, ["Hypertension", "Melanoma"]);
        assert_eq!(ex.labels, [0, 1]);
        assert_eq!(skipped.empty_text, 1);
        assert_eq!(skipped.first_empty_text, Some(4));
        assert_eq!(skipped.unknown_label, 1);
        assert_eq!(skipped.first_unknown_label, Some(5));
    }

    #[test]
    fn numeric_labels_match_their_text() {
        let t = read(b"{\"t\": \"a\", \"y\": 1}\n{\"t\": \"b\", \"y\": 0}\n").unwrap();
        let (ex, _) = t
            .examples("t", "y", &["0".to_string(), "1".to_string()])
            .unwrap();
        assert_eq!(ex.labels, [1, 0]);
    }

    #[test]
    fn errors_name_file_and_line() {
        let err = |bytes: &[u8]| read(bytes).unwrap_err().to_string();
        let e = err(b"{\"text\": \"a\"}\n{\"text\": \"b\xff\"}\n");
        assert!(e.starts_with("notes.jsonl:2: invalid UTF-8"), "{e}");
        let e = err(b"{\"text\": \"a\"}\n{\"text\": \n");
        assert!(e.starts_with("notes.jsonl:2: invalid JSON"), "{e}");
        let e = err(b"[1, 2]\n");
        assert!(
            e.contains("notes.jsonl:1: expected a JSON object, found an array"),
            "{e}"
        );
        let mut long = b"{\"text\": \"".to_vec();
        long.resize(MAX_LINE_BYTES + 10, b'a');
        let e = err(&long);
        assert!(e.starts_with("notes.jsonl:1: line is longer than"), "{e}");
        assert!(err(b"\n\n").contains("no JSON objects"));

        let t = read(b"{\"text\": \"a\", \"label\": \"neoplasms\"}\n{\"label\": \"neoplasms\"}\n")
            .unwrap();
        let e = t
            .examples("text", "label", &labels())
            .unwrap_err()
            .to_string();
        assert_eq!(e, "notes.jsonl:2: no field `text`");
        let t = read(b"{\"text\": 3, \"label\": \"neoplasms\"}\n").unwrap();
        let e = t
            .examples("text", "label", &labels())
            .unwrap_err()
            .to_string();
        assert_eq!(e, "notes.jsonl:1: field `text` is a number, not a string");
        let t = read(b"{\"text\": \"a\", \"label\": [1]}\n").unwrap();
        let e = t
            .examples("text", "label", &labels())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("notes.jsonl:1: no string or number in field `label`"),
            "{e}"
        );
        let t = read(b"{\"text\": \"a\", \"label\": \"ear\"}\n").unwrap();
        let e = t
            .examples("text", "label", &labels())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no usable examples"), "{e}");
    }

    #[test]
    fn split_is_seeded_and_complete() {
        let ex = TextExamples {
            texts: (0..10).map(|i| i.to_string()).collect(),
            labels: (0..10).map(|i| i % 2).collect(),
        };
        let (train, val) = ex.split(0.3, 7);
        assert_eq!((train.len(), val.len()), (7, 3));
        assert_eq!(ex.split(0.3, 7), (train.clone(), val.clone()));
        let mut all: Vec<_> = train.texts.iter().chain(&val.texts).cloned().collect();
        all.sort();
        let mut want = ex.texts.clone();
        want.sort();
        assert_eq!(all, want);
    }
}
