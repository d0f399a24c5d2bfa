//! The rule-agreement test: every `#[consumer(...)]` attribute in the trybuild cases
//! (`tests/ui`) goes through the runtime's start-up check as well, and both must give the
//! same verdict. The macro's verdict is read from the case's `.stderr` (an error inside
//! the attribute's lines), which trybuild pins; the runtime's comes from replaying the
//! attribute's settings through `ConsumerConfig`, exactly as a registered spec is.
//!
//! Attributes whose values cannot be written as a spec (a boolean, a path, a float, an
//! unknown or duplicate key: syntax only the macro sees) are skipped, and counted.

use std::path::Path;

use reliable_mq::__private::{ConsumerSpec, Setting, problems};

/// One attribute found in a case file.
struct Attribute {
    first_line: usize,
    last_line: usize,
    args: String,
}

fn attributes(source: &str) -> Vec<Attribute> {
    let mut found = Vec::new();
    let lines: Vec<&str> = source.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        if let Some(start) = lines[i].find("consumer(")
            && lines[i].trim_start().starts_with("#[")
        {
            let mut text = lines[i][start + "consumer(".len()..].to_owned();
            let first_line = i + 1;
            while !text.trim_end().ends_with(")]") && i + 1 < lines.len() {
                i += 1;
                text.push('\n');
                text.push_str(lines[i]);
            }
            let args = text.trim_end().trim_end_matches(")]").to_owned();
            found.push(Attribute {
                first_line,
                last_line: i + 1,
                args,
            });
        }
        i += 1;
    }
    found
}

/// The attribute's entries as spec settings, or `None` if one cannot be written as one.
fn settings(args: &str) -> Option<Vec<Setting>> {
    let mut settings = Vec::new();
    let mut seen = Vec::new();
    for entry in split_entries(args) {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let (key, value) = match entry.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (entry, None),
        };
        // `crate` and `schema` steer code generation only (which path, whether to call
        // schemars): the runtime never sees them, so such an attribute is not compared.
        if key == "crate" || key == "schema" || seen.contains(&key.to_owned()) {
            return None;
        }
        seen.push(key.to_owned());
        let key: &'static str = Box::leak(key.to_owned().into_boxed_str());
        let setting = match value {
            None if key.chars().all(|c| c.is_alphanumeric() || c == '_') => Setting::flag(key),
            None => return None,
            Some(v) if v.starts_with('"') && v.ends_with('"') && v.len() >= 2 => {
                let inner = v[1..v.len() - 1].replace("\\\"", "\"");
                Setting::str(key, Box::leak(inner.into_boxed_str()))
            }
            Some(v) => match v.parse::<u64>() {
                Ok(n) => Setting::int(key, n),
                Err(_) => return None,
            },
        };
        settings.push(setting);
    }
    Some(settings)
}

/// Split on commas outside string literals.
fn split_entries(args: &str) -> Vec<String> {
    let mut entries = vec![String::new()];
    let mut in_string = false;
    let mut escaped = false;
    for c in args.chars() {
        match c {
            '"' if !escaped => in_string = !in_string,
            ',' if !in_string => {
                entries.push(String::new());
                continue;
            }
            _ => {}
        }
        escaped = c == '\\' && !escaped;
        if let Some(last) = entries.last_mut() {
            last.push(c);
        }
    }
    // Comments inside an attribute.
    entries
        .into_iter()
        .map(|e| {
            e.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// Lines of `name` (a case file) that rustc reported an error at.
fn error_lines(stderr: &str, name: &str) -> Vec<usize> {
    let marker = format!("ui/fail/{name}:");
    stderr
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--> "))
        .filter_map(|loc| loc.strip_prefix(&marker))
        .filter_map(|rest| rest.split(':').next()?.parse().ok())
        .collect()
}

/// Cases whose error sits on an attribute's lines but is about the function, not the
/// settings (the runtime has no function to judge): the second `#[consumer]` on one fn.
const FUNCTION_RULES_ON_AN_ATTRIBUTE: &[&str] = &["two_consumers.rs"];

struct NoHandler;

impl reliable_mq::Handler for NoHandler {
    fn call(
        &self,
        _: std::sync::Arc<reliable_mq::Delivery>,
    ) -> reliable_mq::__private::HandlerFuture {
        Box::pin(async { Ok(()) })
    }
}

#[test]
fn the_macro_and_the_runtime_agree_on_every_ui_case() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
    let (mut compared, mut skipped, mut refused) = (0, 0, 0);
    let mut disagreements = Vec::new();
    for dir in ["pass", "fail"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(dir))
            .expect("ui cases")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .collect();
        files.sort();
        for file in files {
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let source = std::fs::read_to_string(&file).expect("case source");
            let errors = if dir == "fail" {
                let stderr = std::fs::read_to_string(file.with_extension("stderr"))
                    .expect("every fail case has its .stderr");
                error_lines(&stderr, &name)
            } else {
                Vec::new()
            };
            for attribute in attributes(&source) {
                if FUNCTION_RULES_ON_AN_ATTRIBUTE.contains(&name.as_str()) {
                    skipped += 1;
                    continue;
                }
                let Some(settings) = settings(&attribute.args) else {
                    skipped += 1;
                    continue;
                };
                let macro_refuses = errors
                    .iter()
                    .any(|l| (attribute.first_line..=attribute.last_line).contains(l));
                let settings: &'static [Setting] = Box::leak(settings.into_boxed_slice());
                let spec = ConsumerSpec::new("agreement", settings, &NoHandler);
                let runtime = problems(&spec);
                compared += 1;
                refused += usize::from(macro_refuses);
                if macro_refuses == runtime.is_empty() {
                    disagreements.push(format!(
                        "{dir}/{name}:{}: macro {}, runtime {:?}",
                        attribute.first_line,
                        if macro_refuses { "refuses" } else { "accepts" },
                        runtime
                    ));
                }
            }
        }
    }
    println!(
        "{compared} attributes compared ({refused} refused by both), {skipped} syntax-only or function rules skipped"
    );
    assert!(disagreements.is_empty(), "{disagreements:#?}");
    assert!(compared >= 40, "too few cases compared: {compared}");
    assert!(refused >= 20, "too few refused cases compared: {refused}");
}
