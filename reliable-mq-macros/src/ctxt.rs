//! Error collection: every rule reports into one [`Ctxt`], so a build shows all the
//! problems of an attribute at once instead of one per edit-compile cycle.

use std::fmt::Display;

use proc_macro2::Span;
use quote::ToTokens;

/// Errors found while parsing and checking one `#[consumer]` invocation.
#[derive(Default)]
pub struct Ctxt {
    errors: Vec<syn::Error>,
}

impl Ctxt {
    pub fn new() -> Self {
        Self::default()
    }

    /// An error covering `tokens` (first to last token), so rustc underlines all of it.
    pub fn error_spanned_by<T: ToTokens>(&mut self, tokens: T, message: impl Display) {
        self.errors.push(syn::Error::new_spanned(tokens, message));
    }

    /// An error at one span (for errors with no syntax to point at, such as a missing key).
    pub fn error_at(&mut self, span: Span, message: impl Display) {
        self.errors.push(syn::Error::new(span, message));
    }

    /// A parse error from syn, kept as is.
    pub fn syn_error(&mut self, error: syn::Error) {
        self.errors.push(error);
    }

    /// All errors merged into one, or `Ok` when there were none.
    pub fn check(self) -> Result<(), syn::Error> {
        let mut errors = self.errors.into_iter();
        let Some(mut combined) = errors.next() else {
            return Ok(());
        };
        for error in errors {
            combined.combine(error);
        }
        Err(combined)
    }
}
