//! The examples in `docs/` are part of the tests: what a home server or a
//! client author copies from there must be what Confer accepts.

use std::path::Path;

pub fn read(doc: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(doc);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fenced block right after `<!-- example: NAME -->`.
pub fn marked(doc: &str, name: &str) -> String {
    let text = read(doc);
    let marker = format!("<!-- example: {name} -->");
    let after = text
        .split_once(&marker)
        .unwrap_or_else(|| panic!("{doc} has no {marker}"))
        .1;
    fenced(after)
        .into_iter()
        .next()
        .expect("a fenced block after the marker")
        .1
}

/// Every fenced block as (language, body); blocks indented inside a list
/// item lose that indentation.
pub fn fenced(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let indent = line.len() - line.trim_start().len();
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.trim_start().starts_with("```"))
                .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
                .collect();
            out.push((lang.trim().to_owned(), body.join("\n")));
        }
    }
    out
}
