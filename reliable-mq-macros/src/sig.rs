//! The handler function's signature: what `#[consumer]` accepts and what the generated
//! adapter needs to call it.
//!
//! Accepted: `async fn name(payload: T, extractors...) -> R`, where each extractor after
//! the payload is `&Delivery` (at most once) or `State<S>`, in any order. Whether `T`
//! decodes, `S` can be state and `R` is `Result<(), E>` is for the type checker: the
//! expansion asks it with spans on the user's types, so its errors land there.

use syn::{FnArg, GenericArgument, ItemFn, PathArguments, ReturnType, Type};

use crate::ctxt::Ctxt;

/// One parameter after the payload.
pub enum Extractor {
    /// `&Delivery`.
    Delivery,
    /// `State<S>`: the state type `S`.
    State(Box<Type>),
    /// `&mut InboxTx`: the inbox's PostgreSQL transaction (`#[consumer(inbox)]`).
    Inbox,
}

/// What the expansion needs from a valid handler signature.
pub struct HandlerSig {
    pub payload: Type,
    /// The parameters after the payload, in order.
    pub extractors: Vec<Extractor>,
    pub output: Type,
}

const FORMS: &str = "`async fn name(payload: T) -> Result<(), E>`, optionally followed by \
                     `delivery: &Delivery`, `State(s): State<S>` and (with `inbox`) \
                     `tx: &mut InboxTx` parameters in any order";

/// Check the signature, reporting every problem; `None` if the adapter cannot be built.
pub fn check(cx: &mut Ctxt, item: &ItemFn) -> Option<HandlerSig> {
    let mut ok = check_single_consumer(cx, item);
    ok &= check_async(cx, item);
    ok &= check_not_unsafe(cx, item);
    ok &= check_no_receiver(cx, item);
    ok &= check_not_generic(cx, item);
    let params = check_params(cx, item);
    let output = check_return_type(cx, item);
    let (payload, extractors) = params?;
    let output = output?;
    ok.then_some(HandlerSig {
        payload,
        extractors,
        output,
    })
}

/// Each `#[consumer]` defines a type named after the function: two would collide.
fn check_single_consumer(cx: &mut Ctxt, item: &ItemFn) -> bool {
    let Some(second) = item.attrs.iter().find(|attr| {
        attr.path()
            .segments
            .last()
            .is_some_and(|s| s.ident == "consumer")
    }) else {
        return true;
    };
    cx.error_spanned_by(
        second,
        format!(
            "one `#[consumer]` per function: to consume a second queue, write a second \
             function (it can call `{}`)",
            item.sig.ident
        ),
    );
    false
}

/// The runtime drives handlers as futures, and blocking code would stall the channel.
fn check_async(cx: &mut Ctxt, item: &ItemFn) -> bool {
    if item.sig.asyncness.is_some() {
        return true;
    }
    cx.error_spanned_by(
        item.sig.fn_token,
        format!(
            "a consumer must be an `async fn`: write `async fn {}(...)`",
            item.sig.ident
        ),
    );
    false
}

/// The generated adapter calls the function from safe code, with no way to uphold a contract.
fn check_not_unsafe(cx: &mut Ctxt, item: &ItemFn) -> bool {
    let Some(unsafety) = item.sig.unsafety else {
        return true;
    };
    cx.error_spanned_by(
        unsafety,
        "a consumer cannot be `unsafe fn`: remove `unsafe` and use an `unsafe` block inside",
    );
    false
}

/// The adapter calls `name(payload)` with no instance to call a method on.
fn check_no_receiver(cx: &mut Ctxt, item: &ItemFn) -> bool {
    let Some(receiver) = item.sig.receiver() else {
        return true;
    };
    cx.error_spanned_by(
        receiver,
        format!(
            "a consumer is a free function and cannot take `self`: move `{}` out of the \
             `impl` block, and take what it needs as `State(s): State<S>` (registered with \
             `App::with_state`)",
            item.sig.ident
        ),
    );
    false
}

/// The spec is one static value: it needs one concrete payload type to decode into.
fn check_not_generic(cx: &mut Ctxt, item: &ItemFn) -> bool {
    let generics = &item.sig.generics;
    let mut ok = true;
    if !generics.params.is_empty() || generics.where_clause.is_some() {
        cx.error_spanned_by(
            generics,
            "a consumer cannot be generic: the macro must know the payload type to decode; \
             use concrete types (one consumer per payload type)",
        );
        ok = false;
    }
    for arg in &item.sig.inputs {
        if let FnArg::Typed(pat) = arg
            && let Type::ImplTrait(_) = &*pat.ty
        {
            cx.error_spanned_by(
                &pat.ty,
                "a consumer cannot take `impl Trait`: the macro must know the payload type \
                 to decode; use a concrete type",
            );
            ok = false;
        }
    }
    ok
}

/// The adapter passes the decoded payload, then what each extractor names.
fn check_params(cx: &mut Ctxt, item: &ItemFn) -> Option<(Type, Vec<Extractor>)> {
    let typed: Vec<&syn::PatType> = item
        .sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(pat) => Some(pat),
            FnArg::Receiver(_) => None, // reported by `check_no_receiver`
        })
        .collect();
    let Some((payload, rest)) = typed.split_first() else {
        if item.sig.receiver().is_none() {
            cx.error_at(
                item.sig.paren_token.span.join(),
                format!("a consumer takes the decoded message as its parameter: {FORMS}"),
            );
        }
        return None;
    };
    if !check_payload(cx, &payload.ty) {
        // The rest would be judged against a wrong payload: one error says it.
        return None;
    }
    let mut ok = true;
    let mut extractors = Vec::new();
    let mut delivery_seen = false;
    let mut inbox_seen = false;
    for param in rest {
        if let Some(inbox) = is_inbox_tx(&param.ty) {
            match inbox {
                Ok(()) if !inbox_seen => {
                    inbox_seen = true;
                    extractors.push(Extractor::Inbox);
                }
                Ok(()) => {
                    cx.error_spanned_by(
                        &param.ty,
                        "a consumer takes `&mut InboxTx` at most once: remove this one",
                    );
                    ok = false;
                }
                Err(why) => {
                    cx.error_spanned_by(&param.ty, why);
                    ok = false;
                }
            }
            continue;
        }
        match check_extractor(cx, &param.ty, &mut delivery_seen) {
            Some(extractor) => extractors.push(extractor),
            None => ok = false,
        }
    }
    ok.then(|| ((*payload.ty).clone(), extractors))
}

/// The payload is decoded into an owned value; a borrowed one would outlive its buffer.
fn check_payload(cx: &mut Ctxt, ty: &Type) -> bool {
    if is_state(ty).is_some() || is_delivery_ref(ty) {
        cx.error_spanned_by(
            ty,
            format!(
                "the first parameter of a consumer is the decoded message; extractors come \
                 after it: {FORMS}"
            ),
        );
        return false;
    }
    if let Type::Reference(reference) = ty {
        let inner = &reference.elem;
        let owned = match &**inner {
            Type::Path(path) if path.path.is_ident("str") => "String".to_owned(),
            Type::Slice(slice) => {
                let elem = &slice.elem;
                format!("Vec<{}>", quote::quote!(#elem))
            }
            other => quote::quote!(#other).to_string(),
        };
        cx.error_spanned_by(
            ty,
            format!(
                "the payload is decoded into a value the handler owns, it cannot be \
                 borrowed: take `{owned}` instead"
            ),
        );
        return false;
    }
    true
}

/// `&Delivery` (borrowed: the runtime keeps it to settle) or `State<S>` (a clone of state
/// registered with the app); nothing else has a source.
fn check_extractor(cx: &mut Ctxt, ty: &Type, delivery_seen: &mut bool) -> Option<Extractor> {
    if is_delivery_ref(ty) {
        if *delivery_seen {
            cx.error_spanned_by(
                ty,
                "a consumer takes `&Delivery` at most once: remove this one",
            );
            return None;
        }
        *delivery_seen = true;
        return Some(Extractor::Delivery);
    }
    if let Some(state) = is_state(ty) {
        return match state {
            Some(inner) => Some(Extractor::State(Box::new(inner))),
            None => {
                cx.error_spanned_by(ty, "`State` takes the state's type: `State(db): State<Db>`");
                None
            }
        };
    }
    let why = match ty {
        Type::Reference(reference)
            if reference.mutability.is_some() && names_delivery(&reference.elem) =>
        {
            "the delivery is shared, not mutable: take `&Delivery`".to_owned()
        }
        Type::Reference(reference) if is_state(&reference.elem).is_some() => {
            "take state by value, `State(s): State<S>` (it is a cheap clone of what was \
             registered), not by reference"
                .to_owned()
        }
        _ if names_delivery(ty) => "the delivery is borrowed, not owned (the runtime keeps it \
                                    to acknowledge the message): take `&Delivery`"
            .to_owned(),
        _ => {
            let shown = quote::quote!(#ty).to_string();
            format!(
                "a consumer's parameters after the payload are `&Delivery` and `State<S>` \
                 extractors, and `{shown}` is neither: to give the handler a `{shown}`, \
                 register it with `App::with_state(value)` and take `State(value): \
                 State<{shown}>`"
            )
        }
    };
    cx.error_spanned_by(ty, why);
    None
}

/// `Some(Ok)` for `&mut InboxTx`, `Some(Err(fix))` for another way of naming `InboxTx`
/// (by value, shared), `None` for anything else. The runtime owns the transaction (it
/// commits it after the handler): the handler borrows it mutably for the call.
fn is_inbox_tx(ty: &Type) -> Option<Result<(), &'static str>> {
    let names_inbox = |ty: &Type| {
        matches!(ty, Type::Path(path) if path.qself.is_none()
            && path.path.segments.last().is_some_and(|s| s.ident == "InboxTx" && s.arguments.is_none()))
    };
    match ty {
        Type::Reference(reference) if names_inbox(&reference.elem) => {
            Some(if reference.mutability.is_some() {
                Ok(())
            } else {
                Err("the inbox transaction is written to: take `tx: &mut InboxTx`")
            })
        }
        _ if names_inbox(ty) => Some(Err(
            "the runtime owns the inbox transaction (it commits it after the handler): \
             borrow it, `tx: &mut InboxTx`",
        )),
        _ => None,
    }
}

/// Whether `ty` is `&Delivery` (any path ending in `Delivery`, shared).
fn is_delivery_ref(ty: &Type) -> bool {
    matches!(ty, Type::Reference(reference) if reference.mutability.is_none() && names_delivery(&reference.elem))
}

fn names_delivery(ty: &Type) -> bool {
    matches!(ty, Type::Path(path) if path.qself.is_none()
        && path.path.segments.last().is_some_and(|s| s.ident == "Delivery" && s.arguments.is_none()))
}

/// `Some(Some(S))` for `State<S>`, `Some(None)` for a `State` without one type argument,
/// `None` for anything else.
fn is_state(ty: &Type) -> Option<Option<Type>> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if path.qself.is_some() || last.ident != "State" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return Some(None);
    };
    let mut types = args.args.iter().filter_map(|a| match a {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    match (types.next(), types.next()) {
        (Some(inner), None) => Some(Some(inner)),
        _ => Some(None),
    }
}

/// Success or failure decides ack, retry or dead-letter: a handler must say which.
fn check_return_type(cx: &mut Ctxt, item: &ItemFn) -> Option<Type> {
    match &item.sig.output {
        ReturnType::Type(_, ty) => Some((**ty).clone()),
        ReturnType::Default => {
            cx.error_at(
                item.sig.paren_token.span.close(),
                "a consumer must return `Result<(), E>` so failures are retried or \
                 dead-lettered, not acked: add `-> Result<(), HandlerError>` (or any \
                 `std::error::Error` type as `E`)",
            );
            None
        }
    }
}
