//! The topology rules, applied: the model ([`reliable_mq_model::ConsumerModel::validate`])
//! holds every rule, shared with the runtime; this module reports each problem on the
//! tokens of the key it belongs to.

use crate::attr::Attribute;
use crate::ctxt::Ctxt;

/// Report every broken rule of the attribute. `true` when there was none.
pub fn rules(cx: &mut Ctxt, attribute: &Attribute) -> bool {
    let problems = attribute.model.validate();
    for problem in &problems {
        attribute.report(cx, problem);
    }
    problems.is_empty()
}
