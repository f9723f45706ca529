//! Forwarding and NAT for ferrod's networks, in ferrod's own nftables table `inet ferrovisor`.
//!
//! Each network owns base chains of its own in that table (`net-NAME-forward`, and
//! `net-NAME-nat` for NAT networks), so adding or removing a network is one `nft -j -f -`
//! transaction that touches nothing else: no other table is read for rules, changed or flushed.
//! A packet passes a hook only if every base chain on it accepts it, so each network's chain only
//! speaks about its own bridge:
//!
//! - traffic between two ports of the bridge is accepted (with `br_netfilter` it crosses the
//!   forward hook with the bridge as both interfaces);
//! - NAT: what comes from the bridge with a source in the subnet is accepted, and what goes to it
//!   is accepted only when it belongs to a connection made from inside; the subnet is
//!   masqueraded towards everywhere but itself (multicast and broadcast are left alone);
//! - everything else entering or leaving the bridge is rejected: so nothing from an isolated
//!   network leaves its bridge, and two networks never reach each other (each one's chain rejects
//!   new connections towards its own bridge).
//!
//! When the last network's chains go, the table goes too.

use crate::{NetError, find_program};
use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem};
use nftables::helper;
use nftables::schema::{Chain, NfListObject, NfObject, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;

/// ferrod's table (family inet).
pub const TABLE: &str = "ferrovisor";

/// What one network needs from the firewall.
#[derive(Debug, Clone, Copy)]
pub struct NetworkRules<'a> {
    pub network: &'a str,
    pub bridge: &'a str,
    pub subnet: Ipv4Net,
    /// Masquerade to the outside (nat) or keep everything on the bridge (isolated).
    pub nat: bool,
}

fn forward_chain(network: &str) -> String {
    format!("net-{network}-forward")
}

fn nat_chain(network: &str) -> String {
    format!("net-{network}-nat")
}

fn nft() -> Result<std::path::PathBuf, NetError> {
    find_program("nft", "nftables")
}

/// The names of the chains in ferrod's table (empty when the table does not exist).
pub fn chains() -> Result<Vec<String>, NetError> {
    let nft = nft()?;
    let tables = helper::get_current_ruleset_with_args(Some(&nft), ["list", "tables", "inet"])
        .map_err(|e| NetError::host("nft list tables", describe(e)))?;
    let exists = tables.objects.iter().any(|o| matches!(o, NfObject::ListObject(NfListObject::Table(t)) if t.name == TABLE));
    if !exists {
        return Ok(Vec::new());
    }
    let table = helper::get_current_ruleset_with_args(Some(&nft), ["list", "table", "inet", TABLE])
        .map_err(|e| NetError::host(format!("nft list table inet {TABLE}"), describe(e)))?;
    Ok(table
        .objects
        .iter()
        .filter_map(|o| match o {
            NfObject::ListObject(NfListObject::Chain(c)) => Some(c.name.to_string()),
            _ => None,
        })
        .collect())
}

/// Whether `network`'s chains are in place (a running network found after a restart).
pub fn has_rules(network: &str) -> Result<bool, NetError> {
    Ok(chains()?.contains(&forward_chain(network)))
}

/// Puts `rules` in place, replacing whatever chains the network had, in one transaction.
pub fn apply(rules: &NetworkRules) -> Result<(), NetError> {
    let existing = chains()?;
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    for name in [forward_chain(rules.network), nat_chain(rules.network)] {
        if existing.contains(&name) {
            batch.delete(NfListObject::Chain(chain_ref(name)));
        }
    }
    add_rules(&mut batch, rules);
    run(batch, &format!("install the rules of network {}", rules.network))
}

/// Removes `network`'s chains, and the table when no network has chains left.
pub fn remove(network: &str) -> Result<(), NetError> {
    let existing = chains()?;
    let ours = [forward_chain(network), nat_chain(network)];
    let mut batch = Batch::new();
    let mut removed = 0;
    for name in ours.iter().filter(|n| existing.contains(n)) {
        batch.delete(NfListObject::Chain(chain_ref(name.clone())));
        removed += 1;
    }
    if removed == 0 {
        return Ok(());
    }
    if removed == existing.len() {
        batch.delete(NfListObject::Table(table()));
    }
    run(batch, &format!("remove the rules of network {network}"))
}

fn run(batch: Batch, what: &str) -> Result<(), NetError> {
    let nft = nft()?;
    helper::apply_ruleset_with_args(&batch.to_nftables(), Some(&nft), helper::DEFAULT_ARGS)
        .map_err(|e| NetError::host(format!("nft: {what}"), describe(e)))
}

/// nft's own complaint when it has one, rather than the crate's summary.
fn describe(e: helper::NftablesError) -> String {
    match e {
        helper::NftablesError::NftFailed { stderr, .. } if !stderr.trim().is_empty() => stderr.trim().replace('\n', " "),
        e => e.to_string(),
    }
}

fn table() -> Table<'static> {
    Table { family: NfFamily::INet, name: Cow::Borrowed(TABLE), handle: None }
}

fn chain_ref(name: String) -> Chain<'static> {
    Chain { family: NfFamily::INet, table: Cow::Borrowed(TABLE), name: Cow::Owned(name), ..Chain::default() }
}

fn base_chain(name: String, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain { _type: Some(kind), hook: Some(hook), prio: Some(prio), policy: Some(NfChainPolicy::Accept), ..chain_ref(name) }
}

fn add_rules(batch: &mut Batch, r: &NetworkRules) {
    let bridge = || Expression::String(Cow::Owned(r.bridge.to_owned()));
    let iif = || matches(meta(MetaKey::Iifname), bridge(), Operator::EQ);
    let oif = || matches(meta(MetaKey::Oifname), bridge(), Operator::EQ);
    let subnet = || prefix(r.subnet);
    let accept = Statement::Accept(None);

    let forward = forward_chain(r.network);
    batch.add(NfListObject::Chain(base_chain(forward.clone(), NfChainType::Filter, NfHook::Forward, 0)));
    let mut rule = |statements: Vec<Statement<'static>>| {
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            chain: Cow::Owned(forward.clone()),
            expr: Cow::Owned(statements),
            ..Rule::default()
        }))
    };
    rule(vec![iif(), oif(), accept.clone()]);
    if r.nat {
        rule(vec![iif(), matches(ip_field("saddr"), subnet(), Operator::EQ), accept.clone()]);
        let state = Expression::Named(NamedExpression::CT(CT { key: Cow::Borrowed("state"), family: None, dir: None }));
        let established = Expression::List(vec![Expression::String(Cow::Borrowed("established")), Expression::String(Cow::Borrowed("related"))]);
        rule(vec![oif(), matches(ip_field("daddr"), subnet(), Operator::EQ), matches(state, established, Operator::IN), accept.clone()]);
    }
    rule(vec![iif(), Statement::Reject(None)]);
    rule(vec![oif(), Statement::Reject(None)]);

    if r.nat {
        let nat = nat_chain(r.network);
        // srcnat priority
        batch.add(NfListObject::Chain(base_chain(nat.clone(), NfChainType::NAT, NfHook::Postrouting, 100)));
        let multicast: Ipv4Net = "224.0.0.0/24".parse().expect("constant net");
        let not_masqueraded = Expression::Named(NamedExpression::Set(vec![
            SetItem::Element(subnet()),
            SetItem::Element(prefix(multicast)),
            SetItem::Element(Expression::String(Cow::Borrowed("255.255.255.255"))),
        ]));
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            chain: Cow::Owned(nat),
            expr: Cow::Owned(vec![
                matches(ip_field("saddr"), subnet(), Operator::EQ),
                matches(ip_field("daddr"), not_masqueraded, Operator::NEQ),
                Statement::Masquerade(None),
            ]),
            ..Rule::default()
        }));
    }
}

fn matches(left: Expression<'static>, right: Expression<'static>, op: Operator) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ip_field(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Borrowed("ip"),
        field: Cow::Borrowed(field),
    })))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}
