//! Reading `#[consumer(key = value, ...)]`: each entry's key is looked up, its value
//! described in the model's terms ([`Value`]) and handed to [`ConsumerModel::set`], which
//! holds every rule about what a value may be. This module only knows syntax: where each
//! key and value was written, so that problems can point at them.

use std::collections::HashMap;

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use reliable_mq_model::{ConsumerModel, Key, Problem, Site, Value};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Lit, Meta, Token, UnOp};

use crate::ctxt::Ctxt;

/// A value to emit into the generated spec, exactly as the model read it.
pub enum Emit {
    Str(String),
    Int(u64),
    Flag,
}

/// Where one entry was written.
struct Written {
    key: Ident,
    value: TokenStream,
    entry: TokenStream,
}

/// The attribute, read.
#[derive(Default)]
pub struct Attribute {
    pub model: ConsumerModel,
    /// The readable entries, in the order written, to emit into the spec.
    pub settings: Vec<(Key, Emit)>,
    /// `crate = "..."`: the path generated code names the runtime by.
    pub krate: Option<syn::Path>,
    /// `schema`: export the payload type's JSON Schema (where it was written, for errors).
    pub schema: Option<Span>,
    written: HashMap<Key, Written>,
}

impl Attribute {
    /// Report `problem` on the tokens its site names.
    pub fn report(&self, cx: &mut Ctxt, problem: &Problem) {
        let Some(written) = self.written.get(&problem.key) else {
            cx.error_at(Span::call_site(), &problem.message);
            return;
        };
        match problem.site {
            Site::Value => cx.error_spanned_by(&written.value, &problem.message),
            Site::Key => cx.error_spanned_by(&written.key, &problem.message),
            Site::Entry => cx.error_spanned_by(&written.entry, &problem.message),
            Site::Attribute => cx.error_at(Span::call_site(), &problem.message),
        }
    }
}

/// Read the attribute's arguments. `None` when they are not even a comma-separated list
/// of `key = value` (the syntax error is reported; key rules would only add noise).
pub fn parse(cx: &mut Ctxt, tokens: TokenStream) -> Option<Attribute> {
    let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(metas) => metas,
        Err(error) => {
            cx.syn_error(error);
            return None;
        }
    };
    let mut attribute = Attribute::default();
    let mut crate_written = false;
    for meta in metas {
        let Some(ident) = meta.path().get_ident() else {
            cx.error_spanned_by(
                meta.path(),
                format!(
                    "expected a key such as `queue`; valid keys: {}",
                    Key::list()
                ),
            );
            continue;
        };
        if meta.path().is_ident("crate") {
            if crate_written {
                duplicate(cx, ident, "crate");
            } else {
                crate_written = true;
                attribute.krate = crate_path(cx, &meta);
            }
            continue;
        }
        // Not a consumer setting but a request to the generated code (like `crate`), so
        // it is read here rather than by the model the runtime replays.
        if meta.path().is_ident("schema") {
            if attribute.schema.is_some() {
                duplicate(cx, ident, "schema");
            } else if matches!(meta, Meta::Path(_)) {
                attribute.schema = Some(ident.span());
            } else {
                cx.error_spanned_by(
                    &meta,
                    "`schema` is a flag and takes no value: write just `schema`",
                );
            }
            continue;
        }
        read_entry(cx, &mut attribute, ident, &meta);
    }
    Some(attribute)
}

fn read_entry(cx: &mut Ctxt, attribute: &mut Attribute, ident: &Ident, meta: &Meta) {
    let name = ident.to_string();
    let Some(key) = Key::from_name(&name) else {
        let suggestion = Key::suggest(&name);
        attribute.model.suggested.extend(suggestion);
        let message = match suggestion {
            Some(key) => format!(
                "unknown key `{name}`; did you mean `{key}`? valid keys: {}",
                Key::list()
            ),
            None => format!("unknown key `{name}`; valid keys: {}", Key::list()),
        };
        cx.error_spanned_by(ident, message);
        return;
    };
    if attribute.written.contains_key(&key) {
        duplicate(cx, ident, &name);
        return;
    }
    let (value_tokens, text, value) = describe(meta);
    attribute.written.insert(
        key,
        Written {
            key: ident.clone(),
            value: value_tokens,
            entry: meta.to_token_stream(),
        },
    );
    let value = match &value {
        Described::Str(s) => Value::Str(s),
        Described::Value(v) => v.with_text(&text),
    };
    match attribute.model.set(key, value) {
        Ok(()) => {
            let emit = match value {
                Value::Str(s) => Emit::Str(s.to_owned()),
                Value::Int(n) => Emit::Int(n),
                _ => Emit::Flag,
            };
            attribute.settings.push((key, emit));
        }
        Err(problem) => attribute.report(cx, &problem),
    }
}

fn duplicate(cx: &mut Ctxt, ident: &Ident, name: &str) {
    cx.error_spanned_by(
        ident,
        format!("duplicate key `{name}`: it is already set earlier in this attribute; keep one"),
    );
}

/// `crate = "my_alias"`: generated code then names `::my_alias::__private` instead of
/// `::reliable_mq::__private`, for users who renamed the dependency.
fn crate_path(cx: &mut Ctxt, meta: &Meta) -> Option<syn::Path> {
    if let Meta::NameValue(nv) = meta
        && let Expr::Lit(lit) = unwrap_group(&nv.value)
        && let Lit::Str(s) = &lit.lit
    {
        match s.parse::<syn::Path>() {
            Ok(path) => return Some(path),
            Err(_) => {
                cx.error_spanned_by(
                    s,
                    "`crate` expects the path reliable-mq is imported as, e.g. \
                     `crate = \"reliable_mq\"` or `crate = \"::my_alias\"`",
                );
                return None;
            }
        }
    }
    cx.error_spanned_by(
        meta,
        "write `crate = \"reliable_mq\"`: the path the runtime crate is imported as",
    );
    None
}

/// A value described before the model reads it. Strings own their contents, everything
/// else is a [`Value`] that borrows its text later.
enum Described {
    Str(String),
    Value(Shape),
}

#[derive(Clone, Copy)]
enum Shape {
    Flag,
    List,
    Int(u64),
    Negative,
    TooLarge,
    Other { found: &'static str, literal: bool },
}

impl Shape {
    fn with_text(self, text: &str) -> Value<'_> {
        match self {
            Shape::Flag => Value::Flag,
            Shape::List => Value::List,
            Shape::Int(n) => Value::Int(n),
            Shape::Negative => Value::Negative,
            Shape::TooLarge => Value::TooLarge,
            Shape::Other { found, literal } => Value::Other {
                found,
                text,
                literal,
            },
        }
    }
}

/// The value's tokens, its text, and what it is.
fn describe(meta: &Meta) -> (TokenStream, String, Described) {
    match meta {
        Meta::Path(path) => (
            path.to_token_stream(),
            String::new(),
            Described::Value(Shape::Flag),
        ),
        Meta::List(list) => (
            list.to_token_stream(),
            String::new(),
            Described::Value(Shape::List),
        ),
        Meta::NameValue(nv) => {
            let expr = unwrap_group(&nv.value);
            let tokens = expr.to_token_stream();
            let text = match expr {
                Expr::Lit(lit) => lit.lit.to_token_stream().to_string(),
                other => other.to_token_stream().to_string().replace(' ', ""),
            };
            let described = match expr {
                Expr::Lit(lit) => match &lit.lit {
                    Lit::Str(s) => Described::Str(s.value()),
                    // `-1` may arrive as one literal token (as opposed to `-` then `1`).
                    Lit::Int(int) if int.base10_digits().starts_with('-') => {
                        Described::Value(Shape::Negative)
                    }
                    Lit::Int(int) => Described::Value(match int.base10_parse::<u64>() {
                        Ok(n) => Shape::Int(n),
                        Err(_) => Shape::TooLarge,
                    }),
                    other => Described::Value(Shape::Other {
                        found: match other {
                            Lit::Float(_) => "a float",
                            Lit::Bool(_) => "a boolean",
                            Lit::ByteStr(_) | Lit::CStr(_) => "a byte string",
                            Lit::Byte(_) | Lit::Char(_) => "a character",
                            _ => "a literal",
                        },
                        literal: true,
                    }),
                },
                Expr::Unary(unary) if matches!(unary.op, UnOp::Neg(_)) => {
                    match unwrap_group(&unary.expr) {
                        Expr::Lit(lit) if matches!(lit.lit, Lit::Int(_)) => {
                            Described::Value(Shape::Negative)
                        }
                        _ => Described::Value(Shape::Other {
                            found: "an expression",
                            literal: false,
                        }),
                    }
                }
                Expr::Path(_) => Described::Value(Shape::Other {
                    found: "a path",
                    literal: false,
                }),
                Expr::Macro(_) => Described::Value(Shape::Other {
                    found: "a macro call",
                    literal: false,
                }),
                _ => Described::Value(Shape::Other {
                    found: "an expression",
                    literal: false,
                }),
            };
            (tokens, text, described)
        }
    }
}

/// Values passed through a `macro_rules!` arrive wrapped in invisible groups.
fn unwrap_group(expr: &Expr) -> &Expr {
    match expr {
        Expr::Group(group) => unwrap_group(&group.expr),
        other => other,
    }
}
