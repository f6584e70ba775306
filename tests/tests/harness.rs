//! The harness's own pieces, on the real kernel, without the agent: namespaces, cgroups, nft drop
//! rules, keep-alive clients. Root required.
use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use keepalive_tests::cgroup::{cgroup2_mount, current_cgroup};
use keepalive_tests::netns::NFT_TABLE;
use keepalive_tests::tcp::{Client, Family, Keepalive, RecvEnd, Server, ServerMode};
use keepalive_tests::{require_root, serial, Cgroup, Env, NetNs};

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_nft_tables() -> String {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft list tables");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn thread_netns_inode() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

#[test]
fn netns_is_created_isolated_and_removed() {
    let _g = serial();
    require_root();
    let ns = NetNs::new().unwrap();
    let name = ns.name().to_string();
    let path = ns.path().to_path_buf();
    assert!(netns_list()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name.as_str())));

    // The run() thread is in the namespace; the test thread is not.
    let inside = ns.run(thread_netns_inode);
    assert_eq!(inside, ns.inode());
    assert_ne!(thread_netns_inode(), inside);

    // lo is up: both loopback addresses carry traffic inside the namespace.
    for family in [Family::V4, Family::V6] {
        let server = Server::start(&ns, family, ServerMode::Echo).unwrap();
        assert_eq!(server.addr().ip(), family.loopback());
        let mut c = Client::connect(&ns, server.addr(), &Keepalive::new(60, 10, 5)).unwrap();
        c.stream.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        c.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        c.stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(server.wait_accepted(1, Duration::from_secs(1)));
    }

    drop(ns);
    assert!(!path.exists(), "{} still exists", path.display());
    assert!(!netns_list().contains(&name));
}

#[test]
fn dropped_peer_makes_recv_fail_with_etimedout() {
    for family in [Family::V4, Family::V6] {
        let host_tables = host_nft_tables();
        let env = Env::new();
        let server = Server::start(&env.ns, family, ServerMode::Hold).unwrap();
        let mut client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
        assert!(server.wait_accepted(1, Duration::from_secs(5)));
        env.ns.drop_from_port(server.port()).unwrap();
        let rules = env.ns.nft_ruleset().unwrap();
        assert!(
            rules.contains(NFT_TABLE)
                && rules.contains(&format!("tcp sport {} drop", server.port())),
            "{rules}"
        );

        let t0 = Instant::now();
        let end = client.recv_end(Duration::from_secs(15));
        let elapsed = t0.elapsed();
        match end {
            RecvEnd::Error(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT), "{family:?}: {e}")
            }
            other => panic!("{family:?}: expected ETIMEDOUT, got {other:?} after {elapsed:?}"),
        }
        // idle 1 s + 3 probes 1 s apart: about 4 s.
        assert!(
            elapsed > Duration::from_secs(2) && elapsed < Duration::from_secs(10),
            "{family:?}: {elapsed:?}"
        );

        env.ns.restore().unwrap();
        assert!(!env.ns.nft_ruleset().unwrap().contains(NFT_TABLE));
        // The rules lived in the namespace only.
        assert_eq!(host_nft_tables(), host_tables);
    }
}

#[test]
fn restored_peer_answers_again() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let mut client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
    env.ns.drop_from_port(server.port()).unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // the first probe goes unanswered
    env.ns.restore().unwrap();
    client.stream.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    // Still alive after more than idle + cnt * intvl.
    assert!(matches!(
        client.recv_end(Duration::from_secs(5)),
        RecvEnd::TimedOut
    ));
}

#[test]
fn cgroup_holds_the_process_and_is_removed() {
    let _g = serial();
    require_root();
    let before = current_cgroup().unwrap();
    let root = cgroup2_mount().unwrap();
    assert!(
        root.join("cgroup.procs").is_file(),
        "{} is not a cgroup2 root",
        root.display()
    );

    let cg = Cgroup::new().unwrap();
    let path = cg.path().to_path_buf();
    assert!(path.starts_with(&root));
    let rel = format!("/{}", path.strip_prefix(&root).unwrap().display());
    assert_eq!(current_cgroup().unwrap(), rel);
    assert!(cg.procs().unwrap().contains(&std::process::id()));
    // Threads and children follow the process.
    let in_thread =
        std::thread::spawn(|| std::fs::read_to_string("/proc/thread-self/cgroup").unwrap())
            .join()
            .unwrap();
    assert!(
        in_thread.lines().any(|l| l == format!("0::{rel}")),
        "{in_thread}"
    );
    let child = Command::new("cat")
        .arg("/proc/self/cgroup")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&child.stdout)
        .lines()
        .any(|l| l == format!("0::{rel}")));

    drop(cg);
    assert_eq!(current_cgroup().unwrap(), before);
    assert!(!path.exists(), "{} still exists", path.display());
}

#[test]
fn env_leaves_nothing_behind() {
    let (ns_name, cg_path);
    {
        let env = Env::new();
        ns_name = env.ns.name().to_string();
        cg_path = env.cgroup.path().to_path_buf();
        let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
        let _c = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
        env.ns.drop_from_port(server.port()).unwrap();
    }
    assert!(!netns_list().contains(&ns_name));
    assert!(!cg_path.exists());
    assert!(!host_nft_tables().contains(NFT_TABLE));
}
