//! The engines' configurations over real sockets: a member binds the unicast address its
//! configuration names, refuses keys of another group than the configured one, and a bind
//! failure names the address with its cause said once.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rekeycast::gcks::{Gcks, GcksConfig};
use rekeycast::lkh::RegistrationBundle;
use rekeycast::member::{Member, MemberConfig, MemberError};
use rekeycast::report::Chain;

/// A multicast group and port for test `salt` of this process.
fn group(salt: u8) -> SocketAddr {
    rekeycast_testkit::addr::multicast_group(86, salt)
}

/// A GCKS on loopback for `group` and one admitted member's bundle.
fn gcks_and_bundle(group: SocketAddr) -> (Gcks, RegistrationBundle) {
    let mut config = GcksConfig::loopback(group);
    config.group_id = 7;
    config.batch_interval = Duration::from_millis(50);
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[3; 32])).unwrap();
    let bundle = rekeycast_testkit::engine::admit(&gcks, &[1]).swap_remove(0);
    (gcks, bundle)
}

/// A free UDP port of 127.0.0.1 (bound, then let go).
fn free_port() -> u16 {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_member_binds_the_configured_unicast_address() {
    let group = group(0);
    let (gcks, bundle) = gcks_and_bundle(group);
    let mut config = MemberConfig::loopback(group, gcks.local_addr());
    let bind = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    config.bind = bind;
    config.validate().unwrap();
    let member = Member::start(&bundle, config).unwrap();
    assert_eq!(member.local_addr(), bind);
    member.shutdown().unwrap();
    gcks.shutdown().unwrap();
}

#[test]
fn a_member_of_another_group_than_configured_is_refused() {
    let group = group(1);
    let (gcks, bundle) = gcks_and_bundle(group);
    let mut config = MemberConfig::loopback(group, gcks.local_addr());
    config.group_id = Some(8);
    let error = Member::start(&bundle, config.clone()).unwrap_err();
    assert!(
        matches!(
            error,
            MemberError::GroupMismatch {
                configured: 8,
                keys: 7
            }
        ),
        "{error}"
    );
    let text = error.to_string();
    assert!(
        text.contains("group_id 8") && text.contains("(7)"),
        "{text}"
    );
    config.group_id = Some(7);
    let member = Member::start(&bundle, config).unwrap();
    member.shutdown().unwrap();
    gcks.shutdown().unwrap();
}

#[test]
fn a_bind_failure_names_the_address_and_says_its_cause_once() {
    let taken = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = taken.local_addr().unwrap();
    let mut config = GcksConfig::loopback(group(2));
    config.bind = addr;
    let error = Gcks::start(config, SigningKey::from_bytes(&[3; 32])).unwrap_err();
    let text = Chain(&error).to_string();
    assert!(text.contains(&addr.to_string()), "{text}");
    assert_eq!(text.matches("Address already in use").count(), 1, "{text}");

    let group = group(3);
    let (gcks, bundle) = gcks_and_bundle(group);
    let mut config = MemberConfig::loopback(group, gcks.local_addr());
    config.bind = addr;
    let error = Member::start(&bundle, config).unwrap_err();
    let text = Chain(&error).to_string();
    assert!(text.contains(&addr.to_string()), "{text}");
    assert_eq!(text.matches("Address already in use").count(), 1, "{text}");
    gcks.shutdown().unwrap();
    drop(taken);
}
