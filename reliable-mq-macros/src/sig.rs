//! The handler function's signature: what `#[consumer]` accepts and what the generated
//! adapter needs to call it.
//!
//! Accepted: `async fn name(payload: T) -> R` and `async fn name(payload: T, delivery:
//! &Delivery) -> R`. Whether `T` decodes and `R` is `Result<(), E>` is for the type checker:
//! the expansion asks it with spans on `T` and `R`, so its errors land there.

use syn::{FnArg, ItemFn, ReturnType, Type};

use crate::ctxt::Ctxt;

/// What the expansion needs from a valid handler signature.
pub struct HandlerSig {
    pub payload: Type,
    /// Whether the function takes `&Delivery` as a second parameter.
    pub with_delivery: bool,
    pub output: Type,
}

const FORMS: &str = "`async fn name(payload: T) -> Result<(), E>` or \
                     `async fn name(payload: T, delivery: &Delivery) -> Result<(), E>`";

/// Check the signature, reporting every problem; `None` if the adapter cannot be built.
pub fn check(cx: &mut Ctxt, item: &ItemFn) -> Option<HandlerSig> {
    let mut ok = check_single_consumer(cx, item);
    ok &= check_async(cx, item);
    ok &= check_not_unsafe(cx, item);
    ok &= check_no_receiver(cx, item);
    ok &= check_not_generic(cx, item);
    let params = check_params(cx, item);
    let output = check_return_type(cx, item);
    let (payload, with_delivery) = params?;
    let output = output?;
    ok.then_some(HandlerSig {
        payload,
        with_delivery,
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
             `impl` block and pass state through a `static` (e.g. a `OnceLock`)",
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

/// The adapter passes the decoded payload, and optionally the delivery, nothing else.
fn check_params(cx: &mut Ctxt, item: &ItemFn) -> Option<(Type, bool)> {
    let typed: Vec<&syn::PatType> = item
        .sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(pat) => Some(pat),
            FnArg::Receiver(_) => None, // reported by `check_no_receiver`
        })
        .collect();
    match typed.as_slice() {
        [] => {
            if item.sig.receiver().is_none() {
                cx.error_at(
                    item.sig.paren_token.span.join(),
                    format!("a consumer takes the decoded message as its parameter: {FORMS}"),
                );
            }
            None
        }
        [payload] => check_payload(cx, &payload.ty).then(|| ((*payload.ty).clone(), false)),
        [payload, delivery] => {
            let payload_ok = check_payload(cx, &payload.ty);
            let delivery_ok = check_delivery_param(cx, &delivery.ty);
            (payload_ok && delivery_ok).then(|| ((*payload.ty).clone(), true))
        }
        [_, _, extra @ ..] => {
            cx.error_spanned_by(
                quote::quote!(#(#extra),*),
                format!(
                    "a consumer takes at most two parameters, the payload and `&Delivery`: \
                     {FORMS}; remove this parameter"
                ),
            );
            None
        }
    }
}

/// The payload is decoded into an owned value; a borrowed one would outlive its buffer.
fn check_payload(cx: &mut Ctxt, ty: &Type) -> bool {
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

/// The second parameter can only be the delivery, borrowed: the runtime keeps it to settle.
fn check_delivery_param(cx: &mut Ctxt, ty: &Type) -> bool {
    if let Type::Reference(reference) = ty
        && reference.mutability.is_none()
        && let Type::Path(path) = &*reference.elem
        && path.qself.is_none()
        && let Some(last) = path.path.segments.last()
        && last.ident == "Delivery"
        && last.arguments.is_none()
    {
        return true;
    }
    let why = match ty {
        Type::Reference(reference) if reference.mutability.is_some() => {
            "the delivery is shared, not mutable: take `&Delivery`"
        }
        Type::Path(path)
            if path
                .path
                .segments
                .last()
                .is_some_and(|s| s.ident == "Delivery") =>
        {
            "the delivery is borrowed, not owned (the runtime keeps it to acknowledge the \
             message): take `&Delivery`"
        }
        _ => "the second parameter of a consumer must be `&Delivery` (`reliable_mq::Delivery`)",
    };
    cx.error_spanned_by(ty, why);
    false
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
