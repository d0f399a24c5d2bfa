//! Emitting the consumer: the user's function unchanged, a type of the same name whose
//! `SPEC` describes the consumer, the adapter that decodes and calls the function, and
//! the registration in the runtime's link-time list of consumers.
//!
//! Generated code names only `::reliable_mq::__private::…` (or the path given with
//! `crate = "..."`) and `::core::…`, and no `super::`, so it works wherever the function
//! is (a module, a function body). The spec is built by calls, not a struct literal: its
//! settings are replayed through the same model at start-up, so its fields stay private.

use proc_macro2::{Literal, Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Ident, Item, ItemFn};

use crate::attr::{self, Attribute, Emit};
use crate::check;
use crate::ctxt::Ctxt;
use crate::sig::{self, Extractor, HandlerSig};

/// The whole macro: parse, check, emit. On any error, the original item is emitted
/// unchanged next to the errors, so the rest of the crate (and the IDE) still sees it.
pub fn consumer(args: TokenStream, item: TokenStream) -> TokenStream {
    match analyze(args, item.clone()) {
        Ok((function, handler, attribute)) => emit(&function, &handler, &attribute),
        Err(errors) => {
            let errors = errors.to_compile_error();
            quote!(#item #errors)
        }
    }
}

/// Parse and check everything, collecting all the errors.
pub(crate) fn analyze(
    args: TokenStream,
    item: TokenStream,
) -> syn::Result<(ItemFn, HandlerSig, Attribute)> {
    let mut cx = Ctxt::new();
    let function = match syn::parse2::<Item>(item) {
        Ok(Item::Fn(function)) => Some(function),
        Ok(other) => {
            not_a_function(&mut cx, &other);
            None
        }
        Err(error) => {
            cx.syn_error(error);
            None
        }
    };
    let attribute = attr::parse(&mut cx, args);
    if let Some(attribute) = &attribute {
        check::rules(&mut cx, attribute);
    }
    let handler = function.as_ref().and_then(|f| sig::check(&mut cx, f));
    if let (Some(function), Some(handler), Some(attribute)) = (&function, &handler, &attribute) {
        check_inbox_matches(&mut cx, function, handler, attribute);
    }
    cx.check()?;
    match (function, handler, attribute) {
        (Some(function), Some(handler), Some(attribute)) => Ok((function, handler, attribute)),
        // Every `None` above comes with an error; this is a bug, not the user's mistake.
        _ => Err(syn::Error::new(
            Span::call_site(),
            "reliable-mq internal error: `#[consumer]` rejected this without saying why; \
             please report it",
        )),
    }
}

/// The `inbox` key and a `&mut InboxTx` parameter go together: the transaction exists only
/// for inbox consumers, and an inbox whose handler cannot write in its transaction would
/// make nothing exactly once while looking as if it did.
fn check_inbox_matches(
    cx: &mut Ctxt,
    function: &ItemFn,
    handler: &HandlerSig,
    attribute: &Attribute,
) {
    let takes_tx = handler
        .extractors
        .iter()
        .any(|e| matches!(e, Extractor::Inbox));
    // `inbox` written with a value has its own error; the parameter is then no second one.
    let inbox_written = attribute.model.inbox
        || attribute
            .model
            .unreadable
            .contains(&reliable_mq_model::Key::Inbox);
    if takes_tx && !inbox_written {
        let ty = function.sig.inputs.iter().find_map(|arg| match arg {
            syn::FnArg::Typed(pat) if quote!(#pat).to_string().contains("InboxTx") => Some(pat),
            _ => None,
        });
        let message = "`&mut InboxTx` is the transaction of the transactional inbox: add \
                       `inbox` to the `#[consumer(...)]` attribute (feature `postgres`)";
        match ty {
            Some(ty) => cx.error_spanned_by(&ty.ty, message),
            None => cx.error_at(Span::call_site(), message),
        }
    }
    if attribute.model.inbox && !takes_tx {
        cx.error_at(
            function.sig.paren_token.span.join(),
            "an `inbox` consumer writes its effects in the inbox's transaction: take \
             `tx: &mut InboxTx` after the payload and run your queries on it \
             (`.execute(&mut **tx)`)",
        );
    }
}

/// Only a function can be called with a message.
fn not_a_function(cx: &mut Ctxt, item: &Item) {
    let (what, keyword): (&str, TokenStream) = match item {
        Item::Struct(s) => ("a struct", s.struct_token.to_token_stream()),
        Item::Enum(e) => ("an enum", e.enum_token.to_token_stream()),
        Item::Union(u) => ("a union", u.union_token.to_token_stream()),
        Item::Static(s) => ("a static", s.static_token.to_token_stream()),
        Item::Const(c) => ("a const", c.const_token.to_token_stream()),
        Item::Mod(m) => ("a module", m.mod_token.to_token_stream()),
        Item::Impl(i) => ("an impl block", i.impl_token.to_token_stream()),
        Item::Trait(t) => ("a trait", t.trait_token.to_token_stream()),
        Item::Type(t) => ("a type alias", t.type_token.to_token_stream()),
        Item::Use(u) => ("a use declaration", u.use_token.to_token_stream()),
        Item::ExternCrate(e) => ("an extern crate", e.extern_token.to_token_stream()),
        Item::ForeignMod(f) => ("an extern block", f.abi.to_token_stream()),
        Item::Macro(m) => ("a macro", m.mac.path.to_token_stream()),
        _ => ("this item", item.to_token_stream()),
    };
    cx.error_spanned_by(
        keyword,
        format!(
            "`#[consumer]` goes on an `async fn` that handles one message, not on {what}: \
             `async fn name(payload: T) -> Result<(), E>`"
        ),
    );
}

fn emit(function: &ItemFn, handler: &HandlerSig, attribute: &Attribute) -> TokenStream {
    let krate = match &attribute.krate {
        Some(path) => path.to_token_stream(),
        None => quote!(::reliable_mq),
    };
    let p = quote!(#krate::__private);
    let vis = &function.vis;
    let name = &function.sig.ident;
    let plain_name = name.unraw().to_string();
    let registration = format_ident!(
        "__RELIABLE_MQ_CONSUMER_{}",
        plain_name.to_uppercase(),
        span = name.span()
    );
    let doc = format!(
        "The reliable-mq consumer generated by `#[consumer]` for the function \
         `{plain_name}`.\n\n`reliable_mq::run()` runs it; `{plain_name}::SPEC` describes it, \
         for `App::consumer` and tests."
    );
    let settings = attribute.settings.iter().map(|(key, value)| {
        let key = key.as_str();
        match value {
            Emit::Str(s) => quote!(#p::Setting::str(#key, #s)),
            Emit::Int(n) => {
                let n = Literal::u64_suffixed(*n);
                quote!(#p::Setting::int(#key, #n))
            }
            Emit::Flag => quote!(#p::Setting::flag(#key)),
        }
    });
    let handler = handler_impl(&p, name, handler, attribute.schema);
    // What exists only under a `cfg` must bring its consumer along only under that `cfg`.
    let cfgs: Vec<_> = function
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("cfg"))
        .collect();

    quote! {
        #function

        #(#cfgs)*
        #[allow(non_camel_case_types)]
        #[derive(::core::fmt::Debug)]
        #[doc = #doc]
        #vis struct #name {}

        #(#cfgs)*
        impl #name {
            /// The consumer's spec, to register by hand with `App::consumer(name::SPEC)`.
            pub const SPEC: #p::ConsumerSpec = #p::ConsumerSpec::new(
                ::core::concat!(::core::module_path!(), "::", #plain_name),
                &[#(#settings),*],
                &#name {},
            );
        }

        #(#cfgs)*
        #handler

        #(#cfgs)*
        #[#p::linkme::distributed_slice(#p::CONSUMERS)]
        #[linkme(crate = #p::linkme)]
        static #registration: #p::ConsumerSpec = #name::SPEC;
    }
}

/// `impl Handler`: decode, extract, call, convert the result. Each step is spanned on the
/// user's tokens it depends on, so the type checker reports problems there rather than on
/// the attribute: decoding on the payload type (not `Deserialize`), state on the state
/// type (not `Clone + Send + Sync`), the conversion on the return type (not
/// `Result<(), E>`), the boxing on the function's name (a future that is not `Send`).
/// `decode::<T>` is itself the payload check: a separate `assert_payload::<T>()` would
/// report every undecodable payload twice.
fn handler_impl(
    p: &TokenStream,
    name: &Ident,
    handler: &HandlerSig,
    schema: Option<Span>,
) -> TokenStream {
    // Mixed-site hygiene: a user function named `delivery` or `payload` is not shadowed.
    let delivery = Ident::new("delivery", Span::mixed_site());
    let payload = Ident::new("payload", Span::mixed_site());
    let output_span = handler.output.span();
    // Spanned (and resolved) at the return type: rustc reports an unsatisfied bound on an
    // argument at the argument's span, but only if that span is the user's own. Nothing the
    // user wrote is in scope after it is bound, so it cannot capture anything.
    let result = Ident::new("__reliable_mq_result", output_span);

    let payload_ty = &handler.payload;
    // Every path in a spanned step carries the user's span too, or rustc points at the
    // attribute instead.
    let p_at = |span: Span| respan(p, span);
    let p = &p_at(payload_ty.span());
    let decode = quote_spanned! {payload_ty.span()=>
        #p::decode::<#payload_ty>(&#delivery)
    };
    let mut extract = Vec::new();
    let mut args = vec![quote!(#payload)];
    let mut state_types = Vec::new();
    let tx = Ident::new("inbox_tx", Span::mixed_site());
    let mut inbox = false;
    for (i, extractor) in handler.extractors.iter().enumerate() {
        match extractor {
            Extractor::Delivery => args.push(quote!(&#delivery)),
            Extractor::Inbox => {
                inbox = true;
                args.push(quote!(&mut #tx));
            }
            Extractor::State(ty) => {
                let var = Ident::new(&format!("state_{i}"), Span::mixed_site());
                let p = &p_at(ty.span());
                let take = quote_spanned! {ty.span()=>
                    #p::extract_state::<#ty>(&#delivery)
                };
                extract.push(quote!(let #var = #take?;));
                args.push(quote!(#var));
                state_types.push(quote_spanned! {ty.span()=> #p::StateType::of::<#ty>()});
            }
        }
    }
    let p_out = &p_at(output_span);
    let into_result = quote_spanned! {output_span=>
        #p_out::IntoHandlerResult::into_handler_result(#result)
    };
    let p = &p_at(name.span());
    // The inbox's transaction is lent by the runtime for the call and handed back after it,
    // so the runtime commits it (or rolls it back) itself.
    let (take_tx, return_tx) = if inbox {
        (
            quote!(let mut #tx = #p::InboxTx::take()?;),
            quote!(#tx.hand_back();),
        )
    } else {
        (quote!(), quote!())
    };
    let boxed = quote_spanned! {name.span()=>
        #p::Box::pin(async move {
            let #payload: #payload_ty = #decode?;
            #(#extract)*
            #take_tx
            let #result = #name(#(#args),*).await;
            #return_tx
            #into_result
        })
    };
    // `schema`: the bound of `payload_schema` is the check (the type derives
    // `JsonSchema`, the runtime has its `schemars` feature); spanned on the payload type,
    // where the fix goes.
    let payload_schema = schema.map(|_| {
        let p_ty = &p_at(payload_ty.span());
        let call = quote_spanned! {payload_ty.span()=>
            #p_ty::payload_schema::<#payload_ty>()
        };
        let p = &p_at(Span::call_site());
        quote! {
            fn payload_schema(&self) -> ::core::option::Option<#p::JsonValue> {
                ::core::option::Option::Some(#call)
            }
        }
    });
    let p = &p_at(Span::call_site());
    let states = if state_types.is_empty() {
        quote!()
    } else {
        quote! {
            fn states(&self) -> #p::Vec<#p::StateType> {
                #p::vec![#(#state_types),*]
            }
        }
    };
    quote! {
        impl #p::Handler for #name {
            fn call(&self, #delivery: #p::Arc<#p::Delivery>) -> #p::HandlerFuture {
                #boxed
            }
            fn payload_type(&self) -> ::core::option::Option<&'static str> {
                ::core::option::Option::Some(::core::any::type_name::<#payload_ty>())
            }
            #states
            #payload_schema
        }
    }
}

/// `tokens` with every token's span set to `span`.
fn respan(tokens: &TokenStream, span: Span) -> TokenStream {
    tokens
        .clone()
        .into_iter()
        .map(|mut tree| {
            if let proc_macro2::TokenTree::Group(group) = &tree {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), respan(&group.stream(), span));
                inner.set_span(span);
                tree = proc_macro2::TokenTree::Group(inner);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}
